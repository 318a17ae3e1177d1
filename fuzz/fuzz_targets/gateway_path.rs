//! The gateway's request-path normalisation and route matching on arbitrary paths, hosts,
//! methods and headers.
//!
//! Properties: the canonical form is a fixed point (normalising it again borrows it
//! unchanged); it starts with `/`, is ASCII, and holds no empty segment but a trailing one, no
//! dot segment, no backslash, no raw `;` and no encoded slash; and the route the gateway picks
//! for a raw path is the one it picks for that path's canonical form (`None` when refused).
#![no_main]

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use trellis_gateway::Config;
use trellis_gateway::bench::RouteMatchers;

// The gateway's own module, compiled in here: it is private to the crate, pure and has no
// dependency but std, so the target checks the very code the proxy runs.
#[allow(dead_code, unreachable_pub)]
#[path = "../../crates/gateway/src/path.rs"]
mod path;

/// A request as text, so the seed corpus holds real requests: the path on the first line,
/// the host on the second (empty: none), the method's index on the third, then one
/// `name: value` header per line.
#[derive(Debug)]
struct Request {
    path: String,
    host: Option<String>,
    method: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    fn parse(data: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(data).ok()?;
        let mut lines = text.split('\n');
        let path = lines.next()?.to_owned();
        let host = lines.next().filter(|h| !h.is_empty()).map(str::to_owned);
        let method = lines
            .next()
            .and_then(|m| m.trim().parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.to_owned(), value.trim_start().as_bytes().to_vec()))
            .collect();
        Some(Self {
            path,
            host,
            method,
            headers,
        })
    }
}

fn matchers() -> &'static RouteMatchers {
    static MATCHERS: OnceLock<RouteMatchers> = OnceLock::new();
    MATCHERS.get_or_init(|| {
        let text = include_str!("../../crates/gateway/examples/gateway.toml");
        let config = Config::from_toml(text).expect("the example configuration is valid");
        RouteMatchers::from_config(&config).expect("the example's routes compile")
    })
}

fn check_canonical(canonical: &str) {
    assert!(canonical.starts_with('/'), "{canonical:?}");
    assert!(canonical.is_ascii(), "{canonical:?}");
    assert!(
        !canonical.contains('\\') && !canonical.contains(';'),
        "{canonical:?}"
    );
    let upper = canonical.to_ascii_uppercase();
    assert!(
        !upper.contains("%2F") && !upper.contains("%5C"),
        "{canonical:?}"
    );
    let rest = &canonical[1..];
    let segments: Vec<&str> = rest.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        assert!(
            !segment.is_empty() || last,
            "empty segment in {canonical:?}"
        );
        assert!(
            *segment != "." && *segment != "..",
            "dot segment in {canonical:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(request) = Request::parse(data) else {
        return;
    };
    let normalised = path::normalize(&request.path);
    if let Ok(canonical) = &normalised {
        check_canonical(canonical);
        match path::normalize(canonical) {
            Ok(std::borrow::Cow::Borrowed(again)) => assert_eq!(again, canonical.as_ref()),
            other => panic!("not a fixed point: {canonical:?} -> {other:?}"),
        }
    }

    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
    ];
    let method = methods[usize::from(request.method) % methods.len()].clone();
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let host = request.host.as_deref();
    let raw = matchers().find(&method, host, &request.path, &headers);
    match &normalised {
        Ok(canonical) => {
            let canonical = matchers().find(&method, host, canonical, &headers);
            assert_eq!(raw, canonical, "raw and canonical paths route differently");
        }
        Err(_) => assert_eq!(raw, None, "a refused path was routed"),
    }
});
