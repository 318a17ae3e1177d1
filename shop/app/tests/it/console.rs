//! The admin console at `/admin`, through the gateway: who gets in, that every page renders,
//! that actions are confirmed and audited, and (when Chromium and playwright-core are
//! installed, always in CI) the whole tour in a real headless browser.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

use crate::harness::{ADMIN_EMAIL, ADMIN_PASSWORD, Backend, TestShop};

/// A client that shows redirects instead of following them.
fn browser_like() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// `pairs` as an `application/x-www-form-urlencoded` body.
fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |text: &str| {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs in through the login form; the session cookie (`trellis_admin=…`).
async fn sign_in(shop: &TestShop, client: &reqwest::Client, email: &str, password: &str) -> String {
    let response = client
        .post(shop.url("/admin/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("email", email), ("password", password)]))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 303, "an admin signs in");
    assert_eq!(response.headers()[LOCATION], "/admin");
    let cookie = response.headers()[SET_COOKIE]
        .to_str()
        .expect("ASCII")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age="] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    cookie.split(';').next().expect("name=value").to_owned()
}

async fn get(client: &reqwest::Client, shop: &TestShop, path: &str, cookie: &str) -> (u16, String) {
    let response = client
        .get(shop.url(path))
        .header(COOKIE, cookie)
        .send()
        .await
        .expect("get");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

async fn post(
    client: &reqwest::Client,
    shop: &TestShop,
    path: &str,
    cookie: &str,
    pairs: &[(&str, &str)],
) -> reqwest::Response {
    client
        .post(shop.url(path))
        .header(COOKIE, cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(pairs))
        .send()
        .await
        .expect("post")
}

/// A stuck saga in the orders service's saga log: a definition no engine of the shop runs,
/// whose step after the pivot fails for good (so retrying leaves it waiting, running, for an
/// engine that knows it).
async fn stuck_saga(shop: &TestShop) -> String {
    use trellis_saga::{SagaDefinition, SagaEngine, SqliteSagaStore, Step, StepError};
    let url = format!(
        "sqlite://{}",
        shop.dir.path().join("orders-saga.db").display()
    );
    let store = SqliteSagaStore::open(&url)
        .await
        .expect("the orders service's saga log");
    let definition = SagaDefinition::builder("console-check", 1)
        .pivot_step(Step::new("charge", |_: &mut u32, _| {
            Box::pin(async { Ok(()) })
        }))
        .step(Step::new("ship", |_: &mut u32, _| {
            Box::pin(async { Err(StepError::permanent("no carrier")) })
        }))
        .build()
        .expect("valid definition");
    let engine = SagaEngine::new(store).register(definition);
    engine
        .start("console-check", &0_u32)
        .await
        .expect("start")
        .to_string()
}

/// The consumer group the test's dead letters belong to.
const DEAD_LETTER_GROUP: &str = "console-check";

/// A dead letter in the shop's bus: a message the group `console-check` rejected for good.
/// Answers its id, as the admin API lists it.
async fn dead_letter(shop: &TestShop) -> String {
    use trellis_bus::{AnyBus, Bus as _, Envelope, HandlerError, SubscribeOptions};
    let (url, prefix) = &shop.bus;
    let bus = AnyBus::connect(url, prefix).await.expect("the shop's bus");
    let mut subscription = bus
        .subscribe("console.*", DEAD_LETTER_GROUP, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let envelope = Envelope::new(
        "console.checked",
        "console-test",
        "c-1",
        json!({ "note": "<script>alert('x')</script>" }),
    );
    bus.publish("console.checked", envelope)
        .await
        .expect("publish");
    let deliveries = subscription
        .fetch(1, Duration::from_secs(5))
        .await
        .expect("fetch");
    assert_eq!(deliveries.len(), 1, "the message is delivered");
    for delivery in deliveries {
        delivery
            .fail(&HandlerError::permanent(
                "no_handler",
                "nothing handles console.checked 42",
            ))
            .await
            .expect("dead-letter it");
    }
    let (status, letters) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/admin/dlq/dead-letters?group={DEAD_LETTER_GROUP}"),
            Some(shop.admin()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{letters}");
    letters[0]["id"].as_str().expect("a dead letter").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_lets_only_admins_in_and_audits_every_action() {
    // Goal: the gateway sends a stranger to the login page, refuses a bad token (401) and a
    // customer's (403) on every console path, an admin signs in through the form and sees
    // every page; a saga retry, a dead-letter replay and a provider change each need their
    // confirmation and land in the audit log with the admin's name. Method: the whole shop on
    // free ports, a client that does not follow redirects, the session cookie by hand.
    let shop = TestShop::start(Backend::Sqlite, "console")
        .await
        .expect("a SQLite shop needs no server");
    let client = browser_like();

    // Strangers and customers.
    let response = client.get(shop.url("/admin")).send().await.expect("get");
    assert_eq!(response.status(), 303, "no credential: to the login page");
    assert_eq!(response.headers()[LOCATION], "/admin/login");
    let response = client
        .get(shop.url("/admin/login"))
        .send()
        .await
        .expect("login page");
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let page = response.text().await.expect("text");
    assert!(page.contains("<label for=\"email\">") && page.contains("<label for=\"password\">"));
    assert!(!page.contains("<script>"), "no inline script");
    let (status, _) = get(&client, &shop, "/admin", "trellis_admin=not.a.token").await;
    assert_eq!(status, 401, "a bad token");
    let customer = shop.customer("carol").await;
    for path in [
        "/admin",
        "/admin/sagas",
        "/admin/audit",
        "/admin/overview/live",
    ] {
        let (status, _) = get(&client, &shop, path, &format!("trellis_admin={customer}")).await;
        assert_eq!(status, 403, "a customer's cookie on {path}");
        let response = client
            .get(shop.url(path))
            .bearer_auth(&customer)
            .send()
            .await
            .expect("get");
        assert_eq!(
            response.status(),
            403,
            "a customer's bearer token on {path}"
        );
    }
    let response = post(&client, &shop, "/admin/provider", "", &[("outage", "on")]).await;
    assert_eq!(
        response.status(),
        303,
        "an anonymous form is sent to sign in"
    );
    assert!(!shop.shop.provider().config().outage, "and changes nothing");

    // A customer cannot sign in to the console.
    let email = format!("dave-{}@test.local", uuid::Uuid::now_v7().simple());
    let (status, body) = shop
        .call(
            reqwest::Method::POST,
            "/api/users",
            None,
            Some(json!({"email": email, "password": "password-123", "name": "Dave"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let response = client
        .post(shop.url("/admin/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("email", &email), ("password", "password-123")]))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 403);
    assert!(
        response.headers().get(SET_COOKIE).is_none(),
        "no session for a customer"
    );
    let response = client
        .post(shop.url("/admin/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("email", ADMIN_EMAIL),
            ("password", "wrong-password"),
        ]))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 401, "a wrong password");

    // The admin and every page.
    let cookie = sign_in(&shop, &client, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    for (path, expect) in [
        ("/admin", "Circuit breakers"),
        ("/admin/overview/live", "Services"),
        ("/admin/sagas", "Sagas with status stuck"),
        ("/admin/dead-letters", "Failure groups"),
        ("/admin/provider", "Outage"),
        ("/admin/audit", "Actions taken in this console"),
    ] {
        let (status, page) = get(&client, &shop, path, &cookie).await;
        assert_eq!(status, 200, "{path}: {page}");
        assert!(page.contains(expect), "{path} shows {expect:?}");
    }
    let (_, live) = get(&client, &shop, "/admin/overview/live", &cookie).await;
    assert!(!live.contains("<html"), "the live part is a fragment");
    for service in ["gateway", "orders", "payments", "payment-provider"] {
        assert!(
            live.contains(&format!("data-service=\"{service}\"")),
            "{service} on the overview"
        );
    }
    let response = client
        .post(shop.url("/admin/provider"))
        .header(COOKIE, &cookie)
        .header("sec-fetch-site", "cross-site")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("outage", "on"),
            ("latency_ms", "0"),
            ("failure_rate", "0"),
        ]))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 403, "a form from another site");

    // A stuck saga: found by status, retried after confirming.
    let saga = stuck_saga(&shop).await;
    let (_, list) = get(&client, &shop, "/admin/sagas?status=stuck", &cookie).await;
    assert!(list.contains(&saga), "the stuck saga is listed");
    let (status, page) = get(&client, &shop, &format!("/admin/sagas/{saga}"), &cookie).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("no carrier") && page.contains("confirm?action=retry"));
    let (status, page) = get(
        &client,
        &shop,
        &format!("/admin/sagas/{saga}/confirm?action=retry"),
        &cookie,
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("Retry saga"));
    let response = post(
        &client,
        &shop,
        &format!("/admin/sagas/{saga}/retry"),
        &cookie,
        &[],
    )
    .await;
    assert_eq!(response.status(), 400, "not confirmed: nothing done");
    let response = post(
        &client,
        &shop,
        &format!("/admin/sagas/{saga}/retry"),
        &cookie,
        &[("confirm", "yes"), ("step", "")],
    )
    .await;
    assert_eq!(response.status(), 303);
    let (status, timeline) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/admin/sagas/{saga}"),
            Some(shop.admin()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{timeline}");
    assert_ne!(timeline["status"], "stuck", "{timeline}");
    let retried = timeline["log"]
        .as_array()
        .expect("log")
        .iter()
        .find(|entry| entry["transition"]["type"] == "retried")
        .expect("a retry in the saga's log");
    assert_ne!(
        retried["transition"]["operator"], "orders-admin-api",
        "the saga log names the administrator: {retried}"
    );

    // A dead letter: shown inert, replayed after confirming.
    let letter = dead_letter(&shop).await;
    let (_, groups) = get(&client, &shop, "/admin/dead-letters", &cookie).await;
    assert!(groups.contains(DEAD_LETTER_GROUP) && groups.contains("no_handler"));
    let (status, page) = get(
        &client,
        &shop,
        &format!("/admin/dead-letters/{letter}"),
        &cookie,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("console.checked") && !page.contains("<script>alert"));
    let response = post(
        &client,
        &shop,
        &format!("/admin/dead-letters/{letter}/replay"),
        &cookie,
        &[("confirm", "yes")],
    )
    .await;
    assert_eq!(response.status(), 303);
    let (status, letters) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/admin/dlq/dead-letters?group={DEAD_LETTER_GROUP}"),
            Some(shop.admin()),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(letters, json!([]), "replayed: out of the queue");

    // A whole failure group: discarded after confirming.
    let again = dead_letter(&shop).await;
    let (_, letter_json) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/admin/dlq/dead-letters/{again}"),
            Some(shop.admin()),
            None,
        )
        .await;
    let fingerprint = letter_json["fingerprint"].as_str().expect("fingerprint");
    let (status, page) = get(
        &client,
        &shop,
        &format!(
            "/admin/dead-letters/group?{}",
            form(&[("group", DEAD_LETTER_GROUP), ("fingerprint", fingerprint)])
        ),
        &cookie,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(&again),
        "the group page lists its message ({fingerprint:?}): {page}"
    );
    let response = post(
        &client,
        &shop,
        "/admin/dead-letters/group/discard",
        &cookie,
        &[
            ("confirm", "yes"),
            ("group", DEAD_LETTER_GROUP),
            ("fingerprint", fingerprint),
        ],
    )
    .await;
    assert_eq!(response.status(), 303);
    let (_, letters) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/admin/dlq/dead-letters?group={DEAD_LETTER_GROUP}"),
            Some(shop.admin()),
            None,
        )
        .await;
    assert_eq!(letters, json!([]), "the group is discarded");

    // Search by order id: a real order's saga.
    let product = shop.product("Cup", 900, 10).await;
    let order = shop.order(&customer, &product, 1).await;
    let settled = shop.settled(&customer, &order).await;
    assert_eq!(settled["status"], "CONFIRMED", "{settled}");
    let response = client
        .get(shop.url(&format!("/admin/sagas?order={order}")))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("search");
    assert_eq!(response.status(), 303, "found: to the saga");
    let location = response.headers()[LOCATION]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let (status, page) = get(&client, &shop, &location, &cookie).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(&order) && page.contains("data-status=\"completed\""));

    // The provider's switches.
    let response = post(
        &client,
        &shop,
        "/admin/provider",
        &cookie,
        &[
            ("outage", "on"),
            ("latency_ms", "5"),
            ("failure_rate", "0.25"),
        ],
    )
    .await;
    assert_eq!(response.status(), 303);
    let settings = shop.shop.provider().config();
    assert!(settings.outage && settings.latency_ms == 5);
    assert!((settings.failure_rate - 0.25).abs() < 1e-9);
    let response = post(
        &client,
        &shop,
        "/admin/provider",
        &cookie,
        &[("latency_ms", "0"), ("failure_rate", "2")],
    )
    .await;
    assert_eq!(response.status(), 400, "a failure rate above 1");

    // The audit log has all three, with who did them.
    let (_, audit) = get(&client, &shop, "/admin/audit", &cookie).await;
    for action in [
        "saga.retry",
        "dead_letter.replay",
        "dead_letter_group.discard",
        "provider.update",
    ] {
        assert!(audit.contains(action), "{action} audited");
    }
    assert!(audit.contains(ADMIN_EMAIL), "who acted");
    assert!(
        !audit.contains(">requested</span>"),
        "every outcome recorded"
    );

    let response = post(&client, &shop, "/admin/logout", &cookie, &[]).await;
    assert_eq!(response.status(), 303);
    assert!(
        response.headers()[SET_COOKIE]
            .to_str()
            .expect("ASCII")
            .contains("Max-Age=0")
    );
    // The logout ended the session: the old cookie's token is refused at the gateway (within
    // its revocation poll), not merely forgotten by this browser.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (status, _) = get(&client, &shop, "/admin/audit", &cookie).await;
        if status == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the logged-out token still passes: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    shop.stop().await;
}

/// Where the browser test's Node project is (its `node_modules` from `npm ci`).
fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Whether the browser test can run here: Chromium, Node and playwright-core.
fn browser_missing() -> Option<String> {
    if !std::path::Path::new("/usr/bin/chromium").exists() {
        return Some("no /usr/bin/chromium (apt-get install chromium; see .ci/chromium.sh)".into());
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some(format!(
            "no playwright-core (npm ci --prefix {})",
            browser_dir().display()
        ));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_works_in_a_real_browser() {
    // Goal: an operator in headless Chromium signs in, finds a stuck saga and retries it,
    // replays a dead letter, turns on the provider outage and sees the breaker open on the
    // overview, reads the audit log, in a narrow window too; a customer's token is refused.
    // Method: fixtures made here, then tests/browser/console.mjs (playwright-core driving
    // Debian's Chromium) does what an operator would; screenshots go to
    // TRELLIS_CONSOLE_SCREENSHOTS (docs/console/ when refreshing the docs) or a temp dir.
    if let Some(missing) = browser_missing() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the browser test: {missing}"
        );
        eprintln!("skipping the browser test: {missing}");
        return;
    }
    let shop = TestShop::start(Backend::Sqlite, "console_browser")
        .await
        .expect("a SQLite shop needs no server");
    let customer = shop.customer("erin").await;
    let product = shop.product("Lamp", 2_500, 10_000).await;
    let saga = stuck_saga(&shop).await;
    let letter = dead_letter(&shop).await;
    let screenshots = std::env::var_os("TRELLIS_CONSOLE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| shop.dir.path().join("screenshots"));
    std::fs::create_dir_all(&screenshots).expect("screenshot dir");

    let mut command = std::process::Command::new("node");
    command
        .arg(browser_dir().join("console.mjs"))
        .current_dir(browser_dir())
        .env("CONSOLE_BASE", &shop.base)
        .env("ADMIN_EMAIL", ADMIN_EMAIL)
        .env("ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("CUSTOMER_TOKEN", &customer)
        .env("PRODUCT_ID", &product)
        .env("SAGA_ID", &saga)
        .env("DEAD_LETTER_ID", &letter)
        .env("DEAD_LETTER_GROUP", DEAD_LETTER_GROUP)
        .env("SCREENSHOTS", &screenshots);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser tour failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");

    // What the browser did, seen from the API.
    let (_, letters) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/admin/dlq/dead-letters?group={DEAD_LETTER_GROUP}"),
            Some(shop.admin()),
            None,
        )
        .await;
    assert_eq!(letters, json!([]), "the dead letter was replayed");
    let (_, timeline) = shop
        .call(
            reqwest::Method::GET,
            &format!("/api/admin/sagas/{saga}"),
            Some(shop.admin()),
            None,
        )
        .await;
    assert_ne!(
        timeline["status"],
        Value::from("stuck"),
        "the saga was retried"
    );
    shop.stop().await;
}

/// CPU time this process has used (user + system), from /proc/self/stat, in seconds.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (about 90 s), run by hand: cargo test -p shop-app --test it console::the_live_overview -- --ignored --nocapture"]
async fn the_live_overview_costs_little_cpu() {
    // Goal: what one update of the live overview costs the whole shop (gateway, console,
    // every service's /readyz and the /metrics render), as CPU seconds per second of
    // watching. Method: an idle shop's CPU over a quiet period, then over as long a period
    // with an update every 2.1 s (just past the scrape cache, so every update scrapes), the
    // difference divided by the wall time.
    let shop = TestShop::start(Backend::Sqlite, "console_cost")
        .await
        .expect("a SQLite shop needs no server");
    let client = browser_like();
    let cookie = sign_in(&shop, &client, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let customer = shop.customer("frank").await;
    let product = shop.product("Pen", 100, 1_000).await;
    let id = shop.order(&customer, &product, 1).await;
    shop.settled(&customer, &id).await;
    let updates = 20;
    let gap = Duration::from_millis(2_100);

    let started = (std::time::Instant::now(), process_cpu_seconds());
    tokio::time::sleep(gap * updates).await;
    let quiet = process_cpu_seconds() - started.1;
    let quiet_wall = started.0.elapsed().as_secs_f64();

    let started = (std::time::Instant::now(), process_cpu_seconds());
    for _ in 0..updates {
        let (status, _) = get(&client, &shop, "/admin/overview/live", &cookie).await;
        assert_eq!(status, 200);
        tokio::time::sleep(gap).await;
    }
    let watched = process_cpu_seconds() - started.1;
    let watched_wall = started.0.elapsed().as_secs_f64();
    let per_update = (watched - quiet * watched_wall / quiet_wall) / f64::from(updates);
    let share = per_update / 3.0;
    println!(
        "quiet: {quiet:.2} s CPU in {quiet_wall:.0} s; watched: {watched:.2} s CPU in {watched_wall:.0} s; \
         {:.1} ms CPU per update; at one update per 3 s: {:.2} % of one core",
        per_update * 1000.0,
        share * 100.0
    );
    shop.stop().await;
}
