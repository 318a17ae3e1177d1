//! The `trellis` binary as a user meets it: help, version, usage errors, the demo.

use std::process::Command;

fn trellis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
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
