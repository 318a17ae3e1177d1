//! The supervisor against small real child processes (`sh`, `sleep`, `cat`).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use trellis_chaos::supervisor::{
    Backoff, ChildSpec, Error, Event, EventKind, LogLine, Options, Output, Stream, Supervisor,
};

/// Every wait on a real process is bounded by this.
const BOUND: Duration = Duration::from_secs(10);

fn quick() -> Options {
    Options {
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(80),
            reset_after: Duration::from_secs(30),
        },
        grace: Duration::from_secs(2),
        output: Output::Discard,
        own_process_group: true,
    }
}

fn sh(name: &str, script: &str) -> ChildSpec {
    ChildSpec::new(name, "sh").args(["-c", script])
}

/// The next event of `name` that `matches`, within [`BOUND`].
async fn next(
    events: &mut broadcast::Receiver<Event>,
    name: &str,
    matches: impl Fn(&EventKind) -> bool,
) -> Event {
    tokio::time::timeout(BOUND, async {
        loop {
            let event = events.recv().await.expect("the event stream is open");
            if event.name == name && matches(&event.kind) {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no matching event of {name} within {BOUND:?}"))
}

/// Whether `pid` is gone (no such process, or a zombie waiting for a reaper).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_gone(pid: u32) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !gone(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pid {pid} still alive after {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_child_that_exits_is_restarted_with_doubling_capped_delays() {
    let supervisor = Supervisor::new(quick());
    let mut events = supervisor.events();
    supervisor.add(sh("flaky", "exit 3")).await.unwrap();
    let mut delays = Vec::new();
    for _ in 0..4 {
        let exited = next(&mut events, "flaky", |k| {
            matches!(k, EventKind::Exited { .. })
        })
        .await;
        let EventKind::Exited { status, .. } = exited.kind else {
            unreachable!()
        };
        assert_eq!(status.code(), Some(3));
        let scheduled = next(&mut events, "flaky", |k| {
            matches!(k, EventKind::RestartScheduled { .. })
        })
        .await;
        let EventKind::RestartScheduled { delay } = scheduled.kind else {
            unreachable!()
        };
        delays.push(delay);
        let started = next(&mut events, "flaky", |k| {
            matches!(k, EventKind::Started { .. })
        })
        .await;
        assert!(
            started.at.duration_since(scheduled.at) >= delay,
            "restarted before its backoff delay"
        );
    }
    let ms = Duration::from_millis;
    assert_eq!(delays, [ms(20), ms(40), ms(80), ms(80)]);
    let status = supervisor.status("flaky").unwrap();
    assert!(status.restarts >= 4, "{status:?}");
    assert_eq!(status.last_exit.and_then(|s| s.code()), Some(3));
    supervisor.shutdown().await;
}

#[test]
fn backoff_doubles_from_initial_to_max() {
    let backoff = Backoff::default();
    let delays: Vec<_> = (1..=8).map(|n| backoff.delay(n).as_millis()).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    assert_eq!(backoff.delay(u32::MAX), backoff.max);
}

#[tokio::test]
async fn kill_and_terminate_are_followed_by_a_restart() {
    let supervisor = Supervisor::new(quick());
    let mut events = supervisor.events();
    let first = supervisor
        .add(ChildSpec::new("sleeper", "sleep").arg("30"))
        .await
        .unwrap();
    assert_eq!(supervisor.pid("sleeper"), Some(first));

    assert_eq!(supervisor.kill("sleeper").unwrap(), first);
    let exited = next(&mut events, "sleeper", |k| {
        matches!(k, EventKind::Exited { .. })
    })
    .await;
    assert!(
        matches!(exited.kind, EventKind::Exited { status, .. } if status.signal() == Some(9)),
        "{exited:?}"
    );
    let started = next(&mut events, "sleeper", |k| {
        matches!(k, EventKind::Started { .. })
    })
    .await;
    let EventKind::Started {
        pid: second,
        restarts,
    } = started.kind
    else {
        unreachable!()
    };
    assert_eq!(restarts, 1);
    assert_ne!(second, first);
    assert!(started.at > exited.at);
    wait_gone(first).await;

    assert_eq!(supervisor.terminate("sleeper").unwrap(), second);
    let exited = next(&mut events, "sleeper", |k| {
        matches!(k, EventKind::Exited { .. })
    })
    .await;
    assert!(
        matches!(exited.kind, EventKind::Exited { status, .. } if status.signal() == Some(15)),
        "{exited:?}"
    );
    next(&mut events, "sleeper", |k| {
        matches!(k, EventKind::Started { restarts: 2, .. })
    })
    .await;
    let status = supervisor.status("sleeper").unwrap();
    assert_eq!(status.restarts, 2);
    assert_eq!(status.last_exit.and_then(|s| s.signal()), Some(15));
    assert!(status.running());
    supervisor.shutdown().await;
}

#[tokio::test]
async fn stop_holds_a_child_down_until_start() {
    let supervisor = Supervisor::new(quick());
    let mut events = supervisor.events();
    let pid = supervisor
        .add(ChildSpec::new("held", "sleep").arg("30"))
        .await
        .unwrap();
    let status = supervisor.stop("held").await.unwrap();
    assert_eq!(status.and_then(|s| s.signal()), Some(15));
    wait_gone(pid).await;
    next(&mut events, "held", |k| *k == EventKind::Held).await;
    let now = supervisor.status("held").unwrap();
    assert!(now.held && !now.running(), "{now:?}");
    assert!(matches!(supervisor.kill("held"), Err(Error::NotRunning(_))));
    // Several backoff delays pass without a restart.
    let restarted = tokio::time::timeout(
        Duration::from_millis(400),
        next(&mut events, "held", |k| {
            matches!(k, EventKind::Started { .. })
        }),
    )
    .await;
    assert!(restarted.is_err(), "a held child was restarted");
    assert_eq!(
        supervisor.stop("held").await.unwrap(),
        None,
        "stopping twice"
    );

    supervisor.start("held").unwrap();
    next(&mut events, "held", |k| *k == EventKind::Released).await;
    next(&mut events, "held", |k| {
        matches!(k, EventKind::Started { .. })
    })
    .await;
    assert!(supervisor.status("held").unwrap().running());
    supervisor.shutdown().await;
}

#[tokio::test]
async fn output_lines_carry_the_child_name_and_stream() {
    let (sink, mut lines) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(Options {
        output: Output::Capture(sink),
        ..quick()
    });
    supervisor
        .add(sh("talker", "echo one; echo two >&2; printf 'three'"))
        .await
        .unwrap();
    let mut got: Vec<LogLine> = Vec::new();
    tokio::time::timeout(BOUND, async {
        while got.len() < 3 {
            got.push(lines.recv().await.unwrap());
        }
    })
    .await
    .expect("three lines");
    // The last line has no line ending: it is forwarded when the child exits.
    got.sort_by(|a, b| a.line.cmp(&b.line));
    let line = |stream, line: &str| LogLine {
        name: "talker".into(),
        stream,
        line: line.into(),
    };
    assert_eq!(
        got,
        [
            line(Stream::Stdout, "one"),
            line(Stream::Stdout, "three"),
            line(Stream::Stderr, "two")
        ]
    );
    supervisor.shutdown().await;
}

#[tokio::test]
async fn shutdown_terminates_every_child_and_kills_the_stubborn_one() {
    let (sink, mut lines) = mpsc::unbounded_channel();
    let supervisor = Supervisor::new(Options {
        grace: Duration::from_millis(500),
        output: Output::Capture(sink),
        ..quick()
    });
    let mut events = supervisor.events();
    let mut pids = Vec::new();
    for name in ["a", "b", "c"] {
        pids.push(
            supervisor
                .add(ChildSpec::new(name, "sleep").arg("30"))
                .await
                .unwrap(),
        );
    }
    let stubborn = supervisor
        .add(sh(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        ))
        .await
        .unwrap();
    // Its trap is set once it says so.
    tokio::time::timeout(BOUND, lines.recv())
        .await
        .expect("the stubborn child is ready");
    let began = std::time::Instant::now();
    tokio::time::timeout(BOUND, supervisor.shutdown())
        .await
        .expect("shutdown within its bound");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "the stubborn one had its grace: {took:?}"
    );
    for pid in pids.iter().copied().chain([stubborn]) {
        wait_gone(pid).await;
    }
    let mut exits = std::collections::BTreeMap::new();
    while let Ok(event) = events.try_recv() {
        if let EventKind::Exited { status, .. } = event.kind {
            exits.insert(event.name.clone(), status.signal());
        }
        assert!(
            !matches!(event.kind, EventKind::RestartScheduled { .. }),
            "restart during shutdown: {event:?}"
        );
    }
    assert_eq!(exits["a"], Some(15));
    assert_eq!(exits["stubborn"], Some(9));
    assert_eq!(exits.len(), 4);
    assert!(supervisor.statuses().iter().all(|s| s.held && !s.running()));
    assert!(matches!(
        supervisor
            .add(ChildSpec::new("late", "sleep").arg("1"))
            .await,
        Err(Error::ShutDown)
    ));
    supervisor.shutdown().await; // idempotent
}

#[tokio::test]
async fn bad_names_and_programs_are_refused() {
    let supervisor = Supervisor::new(quick());
    let err = supervisor
        .add(ChildSpec::new("ghost", "/nonexistent/program"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err}");
    assert!(supervisor.names().is_empty());
    supervisor
        .add(ChildSpec::new("one", "sleep").arg("30"))
        .await
        .unwrap();
    assert!(matches!(
        supervisor
            .add(ChildSpec::new("one", "sleep").arg("30"))
            .await,
        Err(Error::Duplicate(_))
    ));
    assert!(matches!(
        supervisor.kill("two"),
        Err(Error::UnknownChild(_))
    ));
    assert!(matches!(
        supervisor.stop("two").await,
        Err(Error::UnknownChild(_))
    ));
    supervisor.shutdown().await;
}

const HELPER_ENV: &str = "TRELLIS_CHAOS_ORPHAN_HELPER";

/// Not a test on its own: the supervising parent the orphan test runs in a process of its
/// own (this test binary, started again with `--exact --ignored` and [`HELPER_ENV`] set). It
/// supervises one child that stops at end-of-file on stdin, forwards its output to stdout
/// (prefixed), and waits to be killed.
#[tokio::test]
#[ignore = "a helper process of a_sigkilled_parent_leaves_no_orphan"]
async fn orphan_helper_parent() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let supervisor = Supervisor::new(Options {
        output: Output::Parent,
        ..quick()
    });
    supervisor
        .add(sh("child", "echo \"pid $$\"; exec cat >/dev/null"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test]
async fn a_sigkilled_parent_leaves_no_orphan() {
    use tokio::io::AsyncBufReadExt;

    let mut parent = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "supervisor::orphan_helper_parent",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(parent.stdout.take().unwrap()).lines();
    let child: u32 = tokio::time::timeout(BOUND, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            // The child's line reaches the parent's stdout with the child's name in front
            // (after libtest's `test … ... ` on the same line).
            if let Some((_, pid)) = line.split_once("[child] pid ") {
                return pid.trim().parse().unwrap();
            }
        }
        panic!("the helper ended without printing its child's pid");
    })
    .await
    .expect("the helper's child started");
    assert!(!gone(child));

    parent.start_kill().unwrap(); // SIGKILL: no chance to clean up
    let status = tokio::time::timeout(BOUND, parent.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.signal(), Some(9));
    wait_gone(child).await;
}
