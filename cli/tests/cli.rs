//! The `trellis` binary as a user meets it: help, version, usage errors, the demo.

use std::process::Command;

fn trellis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env_remove("TRELLIS_BUS")
        .output()
        .expect("the trellis binary runs")
}

#[test]
fn version_prints_the_package_version() {
    // `--version` succeeds and names the version from Cargo.toml.
    let out = trellis(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("trellis {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_the_commands() {
    // `--help` succeeds and shows the demo command.
    let out = trellis(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo"));
}

#[test]
fn an_unknown_flag_is_one_line_and_a_nonzero_exit() {
    // A user error prints exactly one line on stderr, no panic or backtrace, and exits 2.
    let out = trellis(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "stderr was: {stderr}");
    assert!(stderr.contains("--no-such-flag"));
    assert!(!stderr.contains("panicked"));
}

#[test]
fn a_bad_demo_setting_is_reported_not_panicked() {
    // An out-of-range value that clap accepts is rejected by the command with one line.
    let out = trellis(&["demo", "breaker", "--failure-rate", "1.5"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "stderr was: {stderr}");
    assert!(stderr.contains("--failure-rate"));
}

#[test]
fn the_breaker_demo_opens_and_closes_the_breaker() {
    // A short outage opens the breaker, calls are rejected fast, and trial calls close it.
    let out = trellis(&[
        "demo",
        "breaker",
        "--calls",
        "120",
        "--outage-from",
        "10",
        "--outage-until",
        "60",
        "--failure-rate",
        "1",
        "--interval-ms",
        "5",
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("closed -> open"), "{stdout}");
    assert!(stdout.contains("half_open -> closed"), "{stdout}");
    assert!(stdout.contains("rejected fast"), "{stdout}");
}

#[test]
fn the_gateway_reports_a_missing_config_file_in_one_line() {
    // A gateway started on a file that does not exist fails with one line naming the file.
    let out = trellis(&["gateway", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "stderr was: {stderr}");
    assert!(stderr.contains("/nonexistent/gateway.toml"), "{stderr}");
}

#[test]
fn the_gateway_names_the_bad_key_of_a_broken_config() {
    // A config whose route points at an undefined cluster is refused, naming the key.
    let dir = std::env::temp_dir().join(format!("trellis-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("broken.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"nowhere\"\n",
    )
    .expect("write config");
    let out = trellis(&["gateway", "--config", path.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "stderr was: {stderr}");
    assert!(stderr.contains("routes[0]"), "{stderr}");
}

/// Puts one poison message into a SQLite bus's dead-letter queue; returns its dead letter's id.
fn dead_letter_in(path: &std::path::Path) -> String {
    use trellis_bus::{
        Bus, DeadLetterFilter, DeadLetters, Envelope, SubscribeOptions, sqlite::SqliteBus,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let bus = SqliteBus::open_path(path).await.expect("open bus");
        let mut subscription = bus
            .subscribe("orders.placed", "billing", SubscribeOptions::default())
            .await
            .expect("subscribe");
        let envelope = Envelope::new(
            "order.placed",
            "orders",
            "o-1",
            serde_json::json!({"total": "x"}),
        );
        bus.publish("orders.placed", envelope)
            .await
            .expect("publish");
        let mut deliveries = Vec::new();
        for _ in 0..50 {
            deliveries = subscription
                .fetch(1, std::time::Duration::from_millis(100))
                .await
                .expect("fetch");
            if !deliveries.is_empty() {
                break;
            }
        }
        let delivery = deliveries.pop().expect("the message arrives");
        delivery
            .poison("total is not a number")
            .await
            .expect("dead-letter it");
        let letters = bus.list(&DeadLetterFilter::default()).await.expect("list");
        assert_eq!(letters.len(), 1);
        letters[0].id.to_string()
    })
}

#[test]
fn dlq_lists_shows_replays_and_discards_dead_letters() {
    // The CLI reads a SQLite bus's dead letters and acts on them, one line of output per action.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bus.db");
    let id = dead_letter_in(&path);
    let bus = format!("sqlite://{}", path.display());

    let list = trellis(&["dlq", "--bus", &bus, "list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(
        table.contains(&id)
            && table.contains("orders.placed")
            && table.contains("1 dead letter(s)"),
        "{table}"
    );

    let groups = trellis(&["dlq", "--bus", &bus, "list", "--groups", "--json"]);
    let groups: serde_json::Value = serde_json::from_slice(&groups.stdout).expect("JSON groups");
    assert_eq!(groups[0]["count"], 1);

    let show = trellis(&["dlq", "--bus", &bus, "show", &id]);
    let letter: serde_json::Value = serde_json::from_slice(&show.stdout).expect("JSON dead letter");
    assert_eq!(letter["topic"], "orders.placed");
    assert_eq!(letter["error"], "total is not a number");

    let replay = trellis(&["dlq", "--bus", &bus, "replay", &id]);
    assert!(
        String::from_utf8_lossy(&replay.stdout).contains("replayed 1"),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let after = trellis(&["dlq", "--bus", &bus, "list"]);
    assert!(String::from_utf8_lossy(&after.stdout).contains("0 dead letter(s)"));

    let unknown = trellis(&[
        "dlq",
        "--bus",
        &bus,
        "discard",
        "00000000-0000-0000-0000-000000000000",
    ]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr)
            .trim()
            .lines()
            .count(),
        1
    );
}

#[test]
fn saga_commands_list_show_skip_cancel_and_purge_a_sqlite_log() {
    // Builds a SQLite saga log holding one stuck saga through trellis-saga, then drives
    // `trellis saga` on it: list and show explain it, a wrong skip is one line and exit 1,
    // the right skip is recorded, unknown ids and missing files are one-line errors.
    use trellis_saga::{SagaDefinition, SagaEngine, SqliteSagaStore, Step, StepError};

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("sagas.db").display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let id = runtime.block_on(async {
        let store = SqliteSagaStore::open(&url).await.expect("open");
        let definition = SagaDefinition::builder("ship-order", 1)
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
            .start("ship-order", &0_u32)
            .await
            .expect("start")
            .to_string()
    });
    drop(runtime);

    let out = trellis(&["saga", "--db", &url, "list", "--status", "stuck"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&id) && stdout.contains("stuck"), "{stdout}");
    assert!(stdout.contains("1 saga(s)"), "{stdout}");

    let out = trellis(&["saga", "--db", &url, "show", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let timeline: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(timeline["steps"][1]["state"], "stuck");
    assert_eq!(timeline["outcome"], "stuck on ship: no carrier");

    let out = trellis(&["saga", "--db", &url, "skip", &id, "charge"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "stderr was: {stderr}");
    assert!(stderr.contains("the current step is ship"), "{stderr}");

    let out = trellis(&[
        "saga",
        "--db",
        &url,
        "--operator",
        "grace",
        "skip",
        &id,
        "ship",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("recorded skipped"));
    let out = trellis(&["saga", "--db", &url, "list", "--json"]);
    let sagas: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(sagas[0]["status"], "running", "waiting for an engine");

    let unknown = "0190b4a8-0000-7000-8000-000000000000";
    let out = trellis(&["saga", "--db", &url, "cancel", unknown]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = trellis(&["saga", "--db", &url, "purge", "--older-than-days", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 0 saga(s)"));

    let missing = format!("sqlite://{}", dir.path().join("nope.db").display());
    let out = trellis(&["saga", "--db", &missing, "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no saga log"));
}

fn one_line_failure(out: &std::process::Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr was: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "stderr was: {stderr}");
    assert!(stderr.contains(needle), "stderr was: {stderr}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn a_choreographed_participant_without_a_bus_is_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    for service in ["inventory", "orders"] {
        let db = format!("sqlite://{}/{service}.db", dir.path().display());
        let out = trellis(&[
            "serve",
            service,
            "--saga",
            "choreography",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--data-dir",
            &dir.path().display().to_string(),
        ]);
        one_line_failure(&out, 1, "needs --bus");
    }
}

#[test]
fn serve_names_the_known_services_for_an_unknown_one() {
    let out = trellis(&["serve", "warehouse"]);
    one_line_failure(&out, 1, "payment-provider");
    let out = trellis(&["serve", "orders", "--bus", "kafka://x"]);
    one_line_failure(&out, 1, "--bus");
}

#[test]
fn load_rejects_bad_settings_and_an_unreachable_target_in_one_line() {
    let out = trellis(&["load", "--duration", "3 weeks"]);
    one_line_failure(&out, 2, "duration");
    let out = trellis(&[
        "load",
        "--target",
        "http://127.0.0.1:9",
        "--rate",
        "5",
        "--duration",
        "1s",
        "--users",
        "1",
        "--quiet",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr was: {stderr}");
    assert!(stderr.contains("127.0.0.1:9"), "stderr was: {stderr}");
    assert!(!stderr.contains("panicked"));
}

#[test]
fn saga_choreography_show_prints_a_choreographed_flow_from_the_service_database() {
    // Runs a two-step choreography's handlers on a SQLite inbox through trellis-saga (the
    // second step declines), then `trellis saga choreography show ID --db URL` prints the
    // timeline rebuilt from the choreography log; unknown ids and missing files are one line.
    use trellis_bus::inbox::SqliteInbox;
    use trellis_bus::outbox::SqliteOutbox;
    use trellis_bus::{Envelope, Message};
    use trellis_saga::choreography::{Choreography, ChoreographyLog, NextEvent, Sqlite};

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("shop.db").display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let correlation = uuid::Uuid::now_v7();
    runtime.block_on(async {
        let log = ChoreographyLog::<Sqlite>::connect(&url).await.expect("log");
        let inbox = SqliteInbox::new(log.pool().clone()).await.expect("inbox");
        SqliteOutbox::new(log.pool().clone()).await.expect("outbox");
        let flow = Choreography::<Sqlite>::new("order-flow", "shop")
            .step("order.placed", "reserve-stock", |_tx, _event| {
                Box::pin(async {
                    Ok(Some(NextEvent::new(
                        "shop.events",
                        "stock.reserved",
                        serde_json::json!({}),
                    )))
                })
            })
            .step("stock.reserved", "charge", |_tx, _event| {
                Box::pin(async {
                    Ok(Some(NextEvent::new(
                        "shop.events",
                        "payment.failed",
                        serde_json::json!({ "error": "card declined" }),
                    )))
                })
            });
        for kind in ["order.placed", "stock.reserved"] {
            let mut envelope =
                Envelope::new(kind, "test", correlation.to_string(), serde_json::json!({}));
            envelope.correlation_id = Some(correlation);
            let message = Message {
                topic: "shop.events".to_owned(),
                group: "shop".to_owned(),
                envelope,
            };
            assert_eq!(flow.handle(&inbox, &message).await.expect("handle"), 1);
        }
    });
    let db = url.trim_end_matches("?mode=rwc");
    let id = correlation.to_string();

    let out = trellis(&["saga", "choreography", "show", &id, "--db", db]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr was: {stderr}");
    let timeline: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(timeline["id"], id.as_str(), "{timeline}");
    assert_eq!(timeline["definition"], "order-flow", "{timeline}");
    assert_eq!(timeline["steps"][0]["state"], "succeeded", "{timeline}");
    assert_eq!(timeline["steps"][1]["step"], "charge", "{timeline}");
    assert_eq!(timeline["steps"][1]["state"], "failed", "{timeline}");

    let unknown = uuid::Uuid::now_v7().to_string();
    let out = trellis(&["saga", "--db", db, "choreography", "show", &unknown]);
    one_line_failure(&out, 1, "no choreography recorded");
    let missing = format!("sqlite://{}", dir.path().join("nope.db").display());
    let out = trellis(&["saga", "choreography", "show", &id, "--db", &missing]);
    one_line_failure(&out, 1, "no database at");
}

fn users_create_admin(db: &str, email: &str, password: Option<&str>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trellis"));
    command
        .args(["users", "create-admin", "--db", db, "--email", email])
        .env_remove("TRELLIS_ADMIN_EMAIL")
        .env_remove("TRELLIS_ADMIN_PASSWORD")
        .env_remove("TRELLIS_DB");
    if let Some(password) = password {
        command.env("TRELLIS_ADMIN_PASSWORD", password);
    }
    command.output().expect("the trellis binary runs")
}

#[tokio::test]
async fn users_create_admin_creates_promotes_and_says_what_it_did() {
    // Goal: a shop run with `trellis serve` gets its first administrator without SQL, and the
    // command is safe to repeat. Method: create an admin in a fresh users database, repeat,
    // demote the account by hand and promote it again, and ask for an account without a
    // password in the environment (no terminal to prompt on).
    let dir = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}/users.db", dir.path().display());
    let out = users_create_admin(&db, "Root@Example.com", Some("a long password"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("created"), "{stdout}");
    assert!(
        !stdout.contains("a long password"),
        "the password is never printed"
    );

    let out = users_create_admin(&db, "root@example.com", None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing changed"));

    let pool = sqlx::SqlitePool::connect(&db).await.expect("the database");
    sqlx::query("UPDATE users SET role = 'customer'")
        .execute(&pool)
        .await
        .expect("demoted");
    let out = users_create_admin(&db, "root@example.com", None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("promoted"));
    let roles: Vec<String> = sqlx::query_scalar("SELECT role FROM users")
        .fetch_all(&pool)
        .await
        .expect("roles");
    assert_eq!(roles, ["admin"], "one account, an administrator again");
    pool.close().await;

    let out = users_create_admin(&db, "new@example.com", None);
    one_line_failure(&out, 1, "TRELLIS_ADMIN_PASSWORD");
}

#[test]
fn saga_commands_refuse_a_database_url_no_backend_serves() {
    // Goal: `trellis saga` names the URL and the schemes it accepts, for the saga log and for
    // the choreography log (which has no in-memory form).
    let out = trellis(&["saga", "--db", "mysql://host/db", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr was: {stderr}");
    assert!(stderr.contains("mysql://host/db"), "stderr was: {stderr}");
    assert!(stderr.contains("sqlite://PATH"), "stderr was: {stderr}");
    let correlation_id = "0190b4a8-0000-7000-8000-000000000000";
    let out = trellis(&[
        "saga",
        "--db",
        "memory://",
        "choreography",
        "show",
        correlation_id,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr was: {stderr}");
    assert!(
        stderr.contains("service's database"),
        "stderr was: {stderr}"
    );
}

/// `trellis agent` as a user runs it: a shop, a scripted OpenAI-compatible model, a customer
/// logging in; the agent lists products and places an order (approved by --approve-all),
/// prints each step and the answer; `runs` and `show` find the run in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_places_an_order_as_the_user_and_the_run_is_listed_and_shown() {
    use serde_json::json;
    use trellis_agent::testing::{Script, Turn, calls, text};

    let dir = tempfile::tempdir().unwrap();
    let mut config = shop_app::ShopConfig::ephemeral(dir.path());
    config.admin = Some(("admin@cli.test".into(), "admin-password-1".into()));
    config.seed_catalog = false;
    let shop = shop_app::up(config).await.expect("the shop starts");
    let gateway = shop.gateway_url();
    let http = reqwest::Client::new();
    let token = |email: &str, password: &str| {
        let http = http.clone();
        let url = format!("{gateway}/api/auth/token");
        let body = json!({"email": email, "password": password});
        async move {
            let answer: serde_json::Value = http
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            answer["access_token"].as_str().unwrap().to_owned()
        }
    };
    let admin = token("admin@cli.test", "admin-password-1").await;
    let product: serde_json::Value = http
        .post(format!("{gateway}/api/products"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Teapot", "price_cents": 1_500, "stock": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let product = product["id"].as_str().unwrap().to_owned();
    let status = http
        .post(format!("{gateway}/api/users"))
        .json(&json!({"email": "cara@cli.test", "password": "password-123", "name": "Cara"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 201);

    let place = json!({"items": [{"product_id": product, "quantity": 1}]}).to_string();
    let model = Script::start(vec![
        Turn::Answer(calls(&[("c1", "list_products", "{}")])),
        Turn::Answer(calls(&[("c2", "place_order", &place)])),
        Turn::Answer(text("I ordered one Teapot for you.")),
    ])
    .await;
    let store = format!("sqlite://{}", dir.path().join("agent.db").display());
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_trellis"))
                .args(&args)
                .env_remove("OPENAI_API_KEY")
                .output()
                .unwrap()
        })
    };
    let out = run(vec![
        "agent".into(),
        "buy me a teapot".into(),
        "--gateway".into(),
        gateway.clone(),
        "--email".into(),
        "cara@cli.test".into(),
        "--password".into(),
        "password-123".into(),
        "--llm-base-url".into(),
        model.base_url(),
        "--llm-model".into(),
        "scripted".into(),
        "--store".into(),
        store.clone(),
        "--approve-all".into(),
    ])
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("→ list_products"), "{stdout}");
    assert!(stdout.contains("✓ list_products"), "{stdout}");
    assert!(stdout.contains("Teapot"), "{stdout}");
    assert!(stdout.contains("✓ place_order"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("I ordered one Teapot for you."),
        "{stdout}"
    );
    let run_id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "run")
        .nth(1)
        .expect("the run id on stderr")
        .to_owned();

    // The order is Cara's, placed once.
    let cara = token("cara@cli.test", "password-123").await;
    let orders: serde_json::Value = http
        .get(format!("{gateway}/api/orders"))
        .bearer_auth(&cara)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(orders["items"].as_array().unwrap().len(), 1, "{orders}");

    let out = run(vec![
        "agent".into(),
        "runs".into(),
        "--store".into(),
        store.clone(),
    ])
    .await
    .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        listed.contains(&run_id) && listed.contains("completed"),
        "{listed}"
    );
    let out = run(vec![
        "agent".into(),
        "show".into(),
        run_id.clone(),
        "--store".into(),
        store,
    ])
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    for needle in [
        "llm-1",
        "tool-1.1:list_products",
        "approve-2.1:place_order",
        "tool-2.1:place_order",
        "user: buy me a teapot",
    ] {
        assert!(shown.contains(needle), "`{needle}` missing from:\n{shown}");
    }
    shop.shutdown().await;
}

/// The parent of `trellis up --processes`, SIGKILLed if a test ends without stopping it (its
/// children then stop at end-of-file on stdin).
struct Parent(std::process::Child);

impl Drop for Parent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `pid` is gone (no such process, or a zombie waiting for a reaper).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// The next stdout line of the parent that `matches`, within `bound`.
async fn line_where(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    bound: std::time::Duration,
    matches: impl Fn(&str) -> bool,
) -> String {
    tokio::time::timeout(bound, async {
        while let Some(line) = lines.recv().await {
            if matches(&line) {
                return line;
            }
        }
        panic!("trellis up --processes ended its output");
    })
    .await
    .expect("the expected line within its bound")
}

/// Places one order as `token` and waits (bounded) until it is CONFIRMED; retries the
/// placing (same idempotency key) while the shop does not accept it yet.
async fn order_confirmed(http: &reqwest::Client, gateway: &str, token: &str, product: &str) {
    use serde_json::json;
    let key = uuid::Uuid::now_v7().to_string();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    let id = loop {
        let answer = http
            .post(format!("{gateway}/api/orders"))
            .bearer_auth(token)
            .header("idempotency-key", &key)
            .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
            .send()
            .await;
        if let Ok(answer) = answer
            && answer.status() == 202
        {
            let body: serde_json::Value = answer.json().await.unwrap();
            break body["id"].as_str().unwrap().to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no order accepted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    loop {
        let answer = http
            .get(format!("{gateway}/api/orders/{id}"))
            .bearer_auth(token)
            .send()
            .await;
        if let Ok(answer) = answer
            && answer.status() == 200
        {
            let body: serde_json::Value = answer.json().await.unwrap();
            if body["status"] == "CONFIRMED" {
                return;
            }
            assert_ne!(body["status"], "CANCELLED", "{body}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "order {id} not confirmed in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The tests that run a whole shop as processes (eight debug-build children each, the chaos
/// runs with fault proxies and a load on top) take turns: several at once on two cores starve
/// each other past their start and settle limits.
static SHOP_AS_PROCESSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `trellis up --processes` on free ports with data in `dir`, as a child of this test; its
/// banner (up to "Ctrl-C stops it.") and the stdout lines after it.
async fn processes_shop(
    dir: &std::path::Path,
) -> (
    Parent,
    Vec<String>,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use std::io::BufRead;
    use std::time::Duration;

    // Its log (the children's lines too) beside the data, shown if it does not start.
    let stderr_path = dir.join("up.stderr");
    let mut parent = Command::new(env!("CARGO_BIN_EXE_trellis"));
    parent
        .args(["up", "--processes", "--free-ports", "--port", "0"])
        .args(["--operator-port", "0", "--data-dir"])
        .arg(dir)
        .env("TRELLIS_ADMIN_EMAIL", "admin@processes.test")
        .env("TRELLIS_ADMIN_PASSWORD", "admin-password-1")
        .env_remove("TRELLIS_BUS")
        .env_remove("TRELLIS_DB")
        .env_remove("TRELLIS_SERVICE_KEY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut parent = Parent(parent.spawn().unwrap());
    let stdout = parent.0.stdout.take().unwrap();
    let (send, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    let started = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(line) = lines.recv().await {
            let done = line == "Ctrl-C stops it.";
            banner.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    if started != Ok(true) {
        let _ = parent.0.kill();
        let _ = parent.0.wait();
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!(
            "trellis up --processes {} before its banner; stdout: {banner:?}; the last lines \
             of its stderr:\n{}",
            if started.is_err() {
                "took over 240 s"
            } else {
                "stopped"
            },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    (parent, banner, lines)
}

/// `trellis up --processes` on free ports: one child process per service, an order served end
/// to end; the orders process SIGKILLed (its pid from the banner) is restarted by the
/// supervisor and the shop confirms orders again; Ctrl-C (SIGINT) stops every child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_processes_serves_orders_and_restarts_a_killed_service() {
    let _turn = SHOP_AS_PROCESSES.lock().await;
    use serde_json::json;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let (mut parent, banner, mut lines) = processes_shop(dir.path()).await;
    let field = |prefix: &str| {
        banner
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in {banner:#?}"))
            .trim()
            .to_owned()
    };
    let gateway = field("  gateway ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let pids: Vec<u32> = banner
        .iter()
        .filter(|l| l.starts_with("  "))
        .filter_map(|l| {
            let (_, rest) = l.split_once("pid ")?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    assert_eq!(
        pids.len(),
        10,
        "eight services, the console and the gateway: {banner:#?}"
    );
    let orders_pid: u32 = field("  orders ")
        .rsplit("pid ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap();

    // An order end to end, as a customer.
    let http = reqwest::Client::new();
    let status = http
        .post(format!("{gateway}/api/users"))
        .json(&json!({"email": "pat@processes.test", "password": "password-123", "name": "Pat"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 201);
    let token: serde_json::Value = http
        .post(format!("{gateway}/api/auth/token"))
        .json(&json!({"email": "pat@processes.test", "password": "password-123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_owned();
    let products: serde_json::Value = http
        .get(format!("{gateway}/api/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let product = products["items"][0]["id"]
        .as_str()
        .expect("the seed catalog")
        .to_owned();
    order_confirmed(&http, &gateway, &token, &product).await;

    // The admin console, a process of its own behind the gateway's /admin: the administrator
    // sees every process ready; a customer is refused.
    let admin: serde_json::Value = http
        .post(format!("{gateway}/api/auth/token"))
        .json(&json!({"email": "admin@processes.test", "password": "admin-password-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin = admin["access_token"].as_str().unwrap().to_owned();
    let overview = http
        .get(format!("{gateway}/admin/overview/live"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    let overview = overview.text().await.unwrap();
    for service in std::iter::once(shop_app::processes::GATEWAY).chain(shop_app::SERVICES) {
        assert!(
            overview.contains(&format!("data-service=\"{service}\"")),
            "{service} missing from the console's overview: {overview}"
        );
    }
    assert_eq!(
        overview.matches("badge good\">ready<").count(),
        9,
        "the gateway and eight services ready: {overview}"
    );
    let refused = http
        .get(format!("{gateway}/admin/overview/live"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(refused, 403, "a customer's token opens no console page");

    // SIGKILL the orders process: the supervisor restarts it and orders are confirmed again.
    let killed = Command::new("kill")
        .args(["-KILL", &orders_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let restarted = line_where(&mut lines, Duration::from_secs(30), |l| {
        l.starts_with("[supervisor] orders restarted (pid ")
    })
    .await;
    let new_pid: u32 = restarted
        .split("pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {restarted:?}"));
    assert_ne!(new_pid, orders_pid);
    assert!(process_gone(orders_pid));
    order_confirmed(&http, &gateway, &token, &product).await;

    // Ctrl-C: every child stops, then the parent, cleanly.
    let interrupted = Command::new("kill")
        .args(["-INT", &parent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    line_where(&mut lines, Duration::from_secs(60), |l| l == "stopped").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = parent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the parent did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    for pid in pids
        .iter()
        .copied()
        .filter(|p| *p != orders_pid)
        .chain([new_pid])
    {
        assert!(process_gone(pid), "child {pid} outlived the parent");
    }
}

/// `trellis chaos` as CI runs it: the shop as processes behind fault proxies, every kind of
/// fault once (shop/chaos/scenarios/ci.toml), and a report in which every invariant holds.
#[test]
fn chaos_runs_a_scenario_and_every_invariant_holds() {
    let _turn = SHOP_AS_PROCESSES.blocking_lock();
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shop/chaos/scenarios/ci.toml"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "chaos",
            "--scenario",
            scenario,
            "--seed",
            "7",
            "--quiet",
            "--json",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("shop"))
        .env_remove("TRELLIS_BUS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["kills"], 4, "{report}");
    assert_eq!(report["network_faults"], 4, "{report}");
    assert_eq!(report["provider_faults"], 1, "{report}");
    let faults = report["faults"].as_array().unwrap();
    assert!(faults.iter().all(|f| f["error"].is_null()), "{report}");
    assert!(
        faults
            .iter()
            .filter(|f| f["kind"] == "kill")
            .all(|f| f["recovered_after_s"].is_number()),
        "{report}"
    );
    let db = &report["databases"];
    for field in [
        "lost_orders",
        "double_captures",
        "stock_mismatches",
        "undelivered_messages",
        "violation_count",
    ] {
        assert_eq!(db[field], 0, "{field}: {report}");
    }
    assert!(
        report["load"]["orders"]["placed"].as_u64().unwrap() > 100,
        "{report}"
    );
    assert_eq!(report["load"]["orders"]["pending"], 0, "{report}");
}

/// The `nats-server` executable the remote chaos test starts (`TRELLIS_TEST_NATS_SERVER`, or
/// Debian's), or `None` with a printed reason outside CI when it or PostgreSQL is missing.
fn remote_chaos_backends(test: &str) -> Option<(String, String)> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let postgres = std::env::var("TRELLIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let nats_server = std::env::var("TRELLIS_TEST_NATS_SERVER")
        .unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned());
    let host_port = postgres
        .split_once("://")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split(['/', '?']).next())
        .map(|authority| authority.rsplit_once('@').map_or(authority, |(_, h)| h))
        .map(|h| {
            if h.contains(':') {
                h.to_owned()
            } else {
                format!("{h}:5432")
            }
        })
        .unwrap_or_default();
    let problem = if !std::path::Path::new(&nats_server).exists() {
        Some(format!(
            "no nats-server at {nats_server} (TRELLIS_TEST_NATS_SERVER)"
        ))
    } else if std::net::TcpStream::connect(&host_port).is_err() {
        Some(format!("PostgreSQL is not reachable at {host_port}"))
    } else {
        None
    };
    match problem {
        None => Some((postgres, nats_server)),
        Some(problem) if in_ci => panic!("CI=true and {problem}"),
        Some(problem) => {
            eprintln!("skipping {test}: {problem}");
            None
        }
    }
}

/// `trellis chaos` on PostgreSQL + NATS, the choreographed saga (every step a message on
/// the bus): a kill, a restart of the NATS server the run started, every PostgreSQL
/// connection killed, the database and the broker each partitioned; every invariant holds,
/// and the run's databases are dropped afterwards.
#[test]
fn chaos_on_postgres_and_nats_restarts_the_broker_and_kills_connections() {
    let Some((postgres, nats_server)) = remote_chaos_backends("chaos_on_postgres_and_nats") else {
        return;
    };
    let _turn = SHOP_AS_PROCESSES.blocking_lock();
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shop/chaos/scenarios/ci-remote.toml"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "chaos",
            "--scenario",
            scenario,
            "--seed",
            "11",
            "--saga",
            "choreography",
            "--quiet",
            "--json",
            "--db",
            &postgres,
            "--nats-server",
            &nats_server,
        ])
        .env_remove("TRELLIS_BUS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["kills"], 3, "{report}");
    assert_eq!(report["backend_faults"], 4, "{report}");
    let faults = report["faults"].as_array().unwrap();
    assert!(faults.iter().all(|f| f["error"].is_null()), "{report}");
    assert!(
        faults
            .iter()
            .filter(|f| f["measured"] == true)
            .all(|f| f["recovered_after_s"].is_number()),
        "{report}"
    );
    let db = &report["databases"];
    for field in [
        "lost_orders",
        "double_captures",
        "stock_mismatches",
        "undelivered_messages",
        "violation_count",
    ] {
        assert_eq!(db[field], 0, "{field}: {report}");
    }
    assert!(
        report["load"]["orders"]["placed"].as_u64().unwrap() > 100,
        "{report}"
    );
    assert_eq!(report["load"]["orders"]["pending"], 0, "{report}");
    // A passed run on a temporary data directory leaves no database behind (seed 11 is this
    // test's own: `chaos_b_<pid>_<service>`).
    let listed = Command::new("psql")
        .args([
            postgres.as_str(),
            "-Atc",
            "SELECT datname FROM pg_database WHERE datname LIKE 'chaos\\_b\\_%'",
        ])
        .output();
    if let Ok(listed) = listed
        && listed.status.success()
    {
        let names = String::from_utf8_lossy(&listed.stdout);
        assert!(names.trim().is_empty(), "databases left: {names}");
    }
}

/// Replicas on PostgreSQL + NATS (issue 18): `trellis chaos` runs the shop with two
/// processes of orders and of payments under load, SIGKILLs one of each mid-load and keeps
/// them down; every accepted order still ends CONFIRMED or CANCELLED (none pending, none
/// lost), no payment is captured twice, stock and messages add up, and the orders flow again
/// after the kill (the surviving orders process takes the dead one's sagas over once their
/// leases expire).
#[test]
fn replicas_on_postgres_and_nats_survive_one_of_each_killed_for_good() {
    let Some((postgres, nats_server)) = remote_chaos_backends("replicas_on_postgres_and_nats")
    else {
        return;
    };
    let _turn = SHOP_AS_PROCESSES.blocking_lock();
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shop/chaos/scenarios/ci-replicas.toml"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "chaos",
            "--scenario",
            scenario,
            "--seed",
            "12",
            "--replicas",
            "orders=2,payments=2",
            "--quiet",
            "--json",
            "--db",
            &postgres,
            "--nats-server",
            &nats_server,
        ])
        .env_remove("TRELLIS_BUS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["kills"], 2, "{report}");
    let faults = report["faults"].as_array().unwrap();
    assert!(faults.iter().all(|f| f["error"].is_null()), "{report}");
    assert!(
        faults
            .iter()
            .filter(|f| f["measured"] == true)
            .all(|f| f["recovered_after_s"].is_number()),
        "orders flow again after the kill: {report}"
    );
    let db = &report["databases"];
    for field in [
        "lost_orders",
        "double_captures",
        "stock_mismatches",
        "undelivered_messages",
        "violation_count",
    ] {
        assert_eq!(db[field], 0, "{field}: {report}");
    }
    assert!(
        report["load"]["orders"]["placed"].as_u64().unwrap() > 100,
        "{report}"
    );
    assert_eq!(report["load"]["orders"]["pending"], 0, "{report}");
}

/// `trellis chaos --gateway URL` against a shop it did not start (`trellis up --processes`):
/// the kill goes through the operator's command, the shop's own supervisor restarts the
/// service, the provider fault through the admin API; the checks read the shop's data
/// directory and the provider's counters. A network fault is refused before the shop is
/// touched (nothing proxies a running shop's services).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_targets_a_running_shop_by_its_urls() {
    let _turn = SHOP_AS_PROCESSES.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (_parent, banner, _lines) = processes_shop(dir.path()).await;
    let url_of = |prefix: &str| {
        banner
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no `{prefix}` line in {banner:#?}"))
            .to_owned()
    };
    let gateway = url_of("  gateway ");
    let provider = url_of("  payment-provider ");
    let data_dir = dir.path().to_str().unwrap().to_owned();
    // Only this test's shop: its children's command lines name its data directory.
    let kill = format!(
        "pkill -KILL -f 'serve {{service}} --exit-with-parent --listen [^ ]+ --data-dir {data_dir}( |$)'"
    );
    let chaos = |scenario: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_trellis"));
        command
            .args([
                "chaos",
                "--scenario",
                scenario,
                "--seed",
                "5",
                "--quiet",
                "--json",
            ])
            .args(["--gateway", &gateway, "--provider", &provider])
            .args(["--data-dir", &data_dir, "--kill-command", &kill])
            .args(["--settle", "2m"])
            .env("TRELLIS_ADMIN_EMAIL", "admin@processes.test")
            .env("TRELLIS_ADMIN_PASSWORD", "admin-password-1")
            .env_remove("TRELLIS_BUS");
        command
    };
    let refused = tokio::task::spawn_blocking({
        let mut command = chaos("partition-payments");
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("network faults need a fault proxy"),
        "{stderr}"
    );

    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shop/chaos/scenarios/ci-running.toml"
    );
    let out = tokio::task::spawn_blocking({
        let mut command = chaos(scenario);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["kills"], 1, "{report}");
    assert_eq!(report["provider_faults"], 1, "{report}");
    let faults = report["faults"].as_array().unwrap();
    assert!(faults.iter().all(|f| f["error"].is_null()), "{report}");
    assert!(faults[0]["recovered_after_s"].is_number(), "{report}");
    let db = &report["databases"];
    assert_eq!(db["violation_count"], 0, "{report}");
    assert_eq!(db["double_captures"], 0, "{report}");
    assert!(
        report["load"]["orders"]["placed"].as_u64().unwrap() > 50,
        "{report}"
    );
}

/// A TLS connection to `addr` trusting the gateway tests' CA; the leaf certificate it
/// presented and the stream.
async fn tls_connect(
    addr: &str,
) -> (
    Vec<u8>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    use rustls::pki_types::pem::PemObject;
    let ca = rustls::pki_types::CertificateDer::from_pem_file(tls_fixture("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake with the gateway");
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (leaf, stream)
}

fn tls_fixture(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/gateway/tests/it/keys/tls")
        .join(file)
}

fn leaf_of(file: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(tls_fixture(file))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_gateway_speaks_https_and_reloads_its_certificate_on_sighup() {
    // Goal: the shop's gateway process serves HTTPS (HSTS on its answers) and a renewed
    // certificate without a restart; method: `trellis serve gateway --tls-cert --tls-key`
    // (its own /openapi.json needs no service), the files replaced, SIGHUP, a new connection.
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncBufReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(tls_fixture("first_cert.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("first_key.pem"), &key).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let operator = format!("127.0.0.1:{}", free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "serve",
            "gateway",
            "--listen",
            &addr,
            "--operator-listen",
            &operator,
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("TRELLIS_SERVICE_KEY")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("gateway listening on https://") {
                return;
            }
        }
        panic!("the gateway ended its output");
    })
    .await
    .expect("the gateway starts");

    let (leaf, stream) = tls_connect(&addr).await;
    assert_eq!(leaf, leaf_of("first_cert.pem"));
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get("/openapi.json")
        .header("host", "localhost")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.headers().contains_key("strict-transport-security"));
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "the OpenAPI document");

    std::fs::copy(tls_fixture("second_cert.pem"), &cert).unwrap();
    std::fs::copy(tls_fixture("second_key.pem"), &key).unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if tls_connect(&addr).await.0 == leaf_of("second_cert.pem") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate is not served after SIGHUP"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the gateway"
    );
    child.kill().await.unwrap();
}
