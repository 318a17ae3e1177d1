//! The gateway's per-request CPU outside the network: route matching over a realistic table
//! and verifying a JWT that is already in the verified-token cache (versus a cold RS256 and
//! HS256 verification, for scale).
//!
//! `cargo bench -p trellis-gateway --bench hot_path`

use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use trellis_gateway::Config;
use trellis_gateway::bench::{JwtVerifier, RouteMatchers};

fn key(file: &str) -> String {
    format!("{}/tests/it/keys/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn config() -> Config {
    let example = std::fs::read_to_string(format!(
        "{}/examples/gateway.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("example config");
    // The example's JWT policy fetches a JWKS; the bench uses static keys instead.
    let start = example.find("[auth.users]").expect("auth section");
    let end = example.find("[auth.partners]").expect("partners section");
    let static_keys = format!(
        "[auth.users]\ntype = \"jwt\"\nissuers = [\"trellis-users\"]\naudiences = [\"trellis-shop\"]\n\
         claims_to_headers = {{ sub = \"x-user-id\" }}\nkeys = [\n\
         {{ kid = \"rsa\", alg = \"RS256\", pem_file = \"{}\" }},\n\
         {{ kid = \"hs\", alg = \"HS256\", secret = \"0123456789abcdef0123456789abcdef-bench\" }},\n]\n\n",
        key("rsa_public.pem")
    );
    let text = format!("{}{}{}", &example[..start], static_keys, &example[end..]);
    Config::from_toml(&text).expect("bench config")
}

fn tokens() -> (String, String) {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "sub": "user-7", "iss": "trellis-users", "aud": "trellis-shop", "exp": exp,
        "roles": ["customer"],
    });
    let mut rsa = Header::new(Algorithm::RS256);
    rsa.kid = Some("rsa".to_owned());
    let private = std::fs::read(key("rsa_private.pem")).expect("key");
    let rsa = encode(
        &rsa,
        &claims,
        &EncodingKey::from_rsa_pem(&private).expect("rsa"),
    )
    .expect("sign");
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("hs".to_owned());
    let hs = encode(
        &hs,
        &claims,
        &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef-bench"),
    )
    .expect("sign");
    (rsa, hs)
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let routes = RouteMatchers::from_config(&config()).expect("routes");
    let headers = HeaderMap::new();
    c.bench_function("route_match/template_6_routes", |b| {
        b.iter(|| {
            routes.find(
                black_box(&Method::GET),
                black_box(Some("api.example.com")),
                black_box("/api/orders/0193-abc"),
                &headers,
            )
        });
    });
    c.bench_function("route_match/last_prefix_route", |b| {
        b.iter(|| {
            routes.find(
                black_box(&Method::POST),
                None,
                black_box("/api/orders"),
                &headers,
            )
        });
    });

    let (rsa, hs) = tokens();
    let verifier = |cache_entries: usize| {
        let mut config = config();
        if let Some(trellis_gateway::config::AuthConfig::Jwt(jwt)) = config.auth.get_mut("users") {
            jwt.token_cache_entries = cache_entries;
        }
        runtime
            .block_on(JwtVerifier::from_config(&config, "users"))
            .expect("verifier")
    };
    let cached = verifier(10_000);
    assert!(
        runtime.block_on(cached.verify(&rsa)),
        "the RS256 token verifies"
    );
    c.bench_function("jwt/rs256_cached_lookup", |b| {
        b.iter(|| cached.is_cached(black_box(&rsa)));
    });
    c.bench_function("jwt/rs256_cached_verify_via_block_on", |b| {
        b.iter(|| runtime.block_on(cached.verify(black_box(&rsa))));
    });
    c.bench_function("runtime/block_on_empty_future", |b| {
        b.iter(|| runtime.block_on(async { black_box(1) }));
    });
    // No cache: every call parses and checks the signature.
    let uncached = verifier(0);
    for (name, token) in [("rs256_uncached", &rsa), ("hs256_uncached", &hs)] {
        assert!(runtime.block_on(uncached.verify(token)), "{name} verifies");
        c.bench_function(&format!("jwt/{name}"), |b| {
            b.iter(|| runtime.block_on(uncached.verify(black_box(token))));
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
