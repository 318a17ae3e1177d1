//! A supervisor of named child processes: started in order, their output forwarded line by
//! line with their name in front, restarted with exponential backoff when they exit or are
//! killed, and killed, terminated, held down or released on demand.
//!
//! It knows nothing of what the children are: `trellis up --processes` runs the shop's
//! services under it, and `trellis chaos` kills them through it and measures how long they
//! take to come back from the [`Event`]s it reports.
//!
//! # Example
//! ```no_run
//! use trellis_chaos::supervisor::{ChildSpec, Options, Supervisor};
//! # async fn demo() -> Result<(), trellis_chaos::supervisor::Error> {
//! let supervisor = Supervisor::new(Options::default());
//! supervisor.add(ChildSpec::new("ticker", "sh").args(["-c", "while :; do date; sleep 1; done"])).await?;
//! let mut events = supervisor.events();
//! supervisor.kill("ticker")?; // SIGKILL; restarted after 100 ms
//! while let Ok(event) = events.recv().await {
//!     println!("{event:?}");
//! #   break;
//! }
//! supervisor.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Restarts
//! A child that exits for any reason (a crash, a clean exit, a signal) is started again after
//! a delay that begins at [`Backoff::initial`] and doubles after each exit up to
//! [`Backoff::max`]; a child that stayed up at least [`Backoff::reset_after`] starts from the
//! initial delay again. [`Supervisor::stop`] holds a child down until [`Supervisor::start`];
//! [`Supervisor::shutdown`] holds them all down for good.
//!
//! # No orphans, without `unsafe`
//! The usual ways to tie a child's life to its parent's (`prctl(PR_SET_PDEATHSIG)` in a
//! `pre_exec` hook) need `unsafe`, which the workspace forbids. Instead every child gets a
//! pipe on its stdin whose only writer is this process: the supervisor never writes to it, and
//! when this process dies, however it dies, the kernel closes the write end and the child
//! reads end-of-file. A child that treats EOF on stdin as "stop" (`trellis serve
//! --exit-with-parent`) therefore never outlives its supervisor. A child that ignores its
//! stdin is not covered by this; [`Supervisor::shutdown`] (and dropping every handle of the
//! supervisor, or the runtime it runs on) still kills it.
//!
//! Each child also gets a process group of its own (by default, [`Options::own_process_group`]),
//! so a Ctrl-C at the terminal reaches only the supervising process, which then stops the
//! children in an orderly way, instead of every child at once while the supervisor restarts
//! them.
//!
//! # Signals
//! SIGKILL and SIGTERM are sent with [`rustix`]'s safe `kill_process` (feature `process`):
//! rustix is already in the workspace's lock file (through `tempfile`), its wrappers are safe
//! functions, and enabling one more of its features is cheaper than adding `nix` (a second
//! libc-wrapper crate with its own build of `libc` bindings). tokio's `Child::start_kill` only
//! sends SIGKILL, and SIGTERM is what a graceful stop needs. A pid is signalled only while its
//! child is recorded as running: the supervisor reaps its own children and clears the record
//! right after, with no await in between, so a signal cannot reach a stranger that reused
//! the pid unless the pid is reused within those few microseconds.
//!
//! Signals exist on Unix only; this module builds there.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long output forwarding may lag behind a child's exit before it is cut off (a
/// grandchild that inherited the child's stdout would otherwise hold it open for ever).
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// What to run as one supervised child: a program, its arguments and environment, under a
/// name that is unique within one [`Supervisor`].
#[derive(Debug, Clone)]
pub struct ChildSpec {
    name: String,
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    current_dir: Option<PathBuf>,
}

impl ChildSpec {
    /// A child named `name` running `program` (looked up on `PATH` when it has no slash),
    /// with the supervisor's environment.
    pub fn new(name: impl Into<String>, program: impl Into<OsString>) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
        }
    }

    /// Adds one argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the child.
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable the child would inherit.
    #[must_use]
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env.push((key.into(), None));
        self
    }

    /// Runs the child in `dir`.
    #[must_use]
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The program.
    pub fn program(&self) -> &OsString {
        &self.program
    }

    /// The arguments.
    pub fn get_args(&self) -> &[OsString] {
        &self.args
    }

    fn command(&self, own_process_group: bool) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in &self.env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        if own_process_group {
            command.process_group(0);
        }
        command
    }
}

/// The delays between a child's exit and its restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first exit (and after an exit of a child that stayed up at least
    /// `reset_after`).
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A child up at least this long counts as healthy: its next restart waits `initial`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling to 5 s, reset after 10 s up.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before the restart that follows the `exits`-th exit in a row (1 for the
    /// first): `initial`, then doubling, capped at `max`.
    pub fn delay(&self, exits: u32) -> Duration {
        let doublings = exits.saturating_sub(1).min(31);
        self.initial
            .saturating_mul(1_u32 << doublings)
            .min(self.max)
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The child's stdout.
    Stdout,
    /// The child's stderr.
    Stderr,
}

/// One line a child wrote (without its line ending; invalid UTF-8 replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The child's name.
    pub name: String,
    /// Where it wrote it.
    pub stream: Stream,
    /// The line.
    pub line: String,
}

/// Where the children's output goes.
#[derive(Debug, Clone, Default)]
pub enum Output {
    /// To this process's stdout and stderr, each line as `[name] line`.
    #[default]
    Parent,
    /// Into a channel, one [`LogLine`] per line (tests, or a caller with its own log).
    Capture(mpsc::UnboundedSender<LogLine>),
    /// Nowhere.
    Discard,
}

/// How a [`Supervisor`] runs its children.
#[derive(Debug, Clone)]
pub struct Options {
    /// Restart delays.
    pub backoff: Backoff,
    /// How long [`Supervisor::stop`] and [`Supervisor::shutdown`] wait after SIGTERM before
    /// they send SIGKILL.
    pub grace: Duration,
    /// Where output goes.
    pub output: Output,
    /// Start each child in a process group of its own, so a terminal's Ctrl-C reaches only
    /// the supervisor (which then stops the children itself).
    pub own_process_group: bool,
}

impl Default for Options {
    /// Default backoff, a 10 s grace, output to the parent, own process groups.
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            grace: Duration::from_secs(10),
            output: Output::Parent,
            own_process_group: true,
        }
    }
}

/// Something that happened to a child, with when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The child's name.
    pub name: String,
    /// When (monotonic: subtract two events' `at` to measure).
    pub at: Instant,
    /// When, by the wall clock (for reports).
    pub time: SystemTime,
    /// What.
    pub kind: EventKind,
}

/// What happened to a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A process was started: the first time (`restarts == 0`) or again.
    Started {
        /// Its pid.
        pid: u32,
        /// How many times this child was started before this one.
        restarts: u32,
    },
    /// The process exited or was killed.
    Exited {
        /// How it ended (`ExitStatusExt::signal` tells a kill).
        status: ExitStatus,
        /// How long it had been up.
        uptime: Duration,
    },
    /// It will be started again after `delay`.
    RestartScheduled {
        /// The backoff delay.
        delay: Duration,
    },
    /// A start failed (the program could not be executed); it is retried with backoff.
    SpawnFailed {
        /// Why.
        error: String,
    },
    /// [`Supervisor::stop`] holds it down: not restarted until [`Supervisor::start`].
    Held,
    /// [`Supervisor::start`] released it.
    Released,
}

/// A child's state now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildStatus {
    /// Its name.
    pub name: String,
    /// The running process's pid; `None` while it is down.
    pub pid: Option<u32>,
    /// Held down by [`Supervisor::stop`] or [`Supervisor::shutdown`].
    pub held: bool,
    /// How many times it was started again after the first start.
    pub restarts: u32,
    /// How the last process ended.
    pub last_exit: Option<ExitStatus>,
    /// When the running process started.
    pub started_at: Option<Instant>,
    /// Why the last start failed, if it did.
    pub last_error: Option<String>,
}

impl ChildStatus {
    /// Whether a process is running.
    pub fn running(&self) -> bool {
        self.pid.is_some()
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No child has that name.
    #[error("no child named {0:?}")]
    UnknownChild(String),
    /// A child with that name exists already.
    #[error("a child named {0:?} exists already")]
    Duplicate(String),
    /// The child is not running (held down, or waiting to be restarted).
    #[error("the child {0:?} is not running")]
    NotRunning(String),
    /// The program could not be started.
    #[error("cannot start {name}: {source}")]
    Spawn {
        /// The child.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// A signal could not be sent.
    #[error("cannot signal {name} (pid {pid}): {source}")]
    Signal {
        /// The child.
        name: String,
        /// Its pid.
        pid: u32,
        /// Why.
        source: std::io::Error,
    },
    /// The supervisor was shut down.
    #[error("the supervisor is shut down")]
    ShutDown,
}

/// A signal [`send_signal`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL: stop now.
    Kill,
}

/// Sends `signal` to the process `pid` (any process this one may signal; the supervisor's
/// own [`Supervisor::kill`] and [`Supervisor::terminate`] are the safe way to reach its
/// children).
///
/// # Errors
/// The OS error (`ESRCH`: no such process; `EPERM`; `EINVAL` for pid 0 or one that does not
/// fit a pid).
pub fn send_signal(pid: u32, signal: Signal) -> std::io::Result<()> {
    let raw = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(22))?;
    let pid =
        rustix::process::Pid::from_raw(raw).ok_or_else(|| std::io::Error::from_raw_os_error(22))?;
    let signal = match signal {
        Signal::Term => rustix::process::Signal::TERM,
        Signal::Kill => rustix::process::Signal::KILL,
    };
    rustix::process::kill_process(pid, signal).map_err(std::io::Error::from)
}

/// A supervisor of named child processes. Cheap to clone; every clone drives the same
/// children. Dropping the last clone without [`Supervisor::shutdown`] kills the children at
/// once (SIGKILL).
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: Options,
    children: Mutex<Vec<ChildHandle>>,
    shared: Arc<Shared>,
    lines: Option<mpsc::Sender<LogLine>>,
}

/// What the monitor tasks share with the handles (not the command senders: their closing
/// tells the monitors the supervisor is gone).
#[derive(Debug)]
struct Shared {
    events: broadcast::Sender<Event>,
    shut: Mutex<bool>,
}

#[derive(Debug)]
struct ChildHandle {
    name: String,
    state: Arc<Mutex<ChildStatus>>,
    commands: mpsc::UnboundedSender<Command_>,
    task: Option<JoinHandle<()>>,
}

#[derive(Debug)]
enum Command_ {
    Stop(oneshot::Sender<Option<ExitStatus>>),
    Start,
    Shutdown,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Supervisor {
    /// A supervisor with no children yet. Must be called within a tokio runtime (with
    /// `Output::Parent` it starts one thread that writes the children's lines).
    pub fn new(options: Options) -> Self {
        let lines = match &options.output {
            Output::Parent => {
                let (send, mut receive) = mpsc::channel::<LogLine>(1024);
                std::thread::Builder::new()
                    .name("supervisor-output".to_owned())
                    .spawn(move || {
                        use std::io::Write;
                        while let Some(line) = receive.blocking_recv() {
                            let text = format!("[{}] {}\n", line.name, line.line);
                            let _ = match line.stream {
                                Stream::Stdout => {
                                    std::io::stdout().lock().write_all(text.as_bytes())
                                }
                                Stream::Stderr => {
                                    std::io::stderr().lock().write_all(text.as_bytes())
                                }
                            };
                        }
                    })
                    .ok()
                    .map(|_| send)
            }
            Output::Capture(_) | Output::Discard => None,
        };
        let (events, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                options,
                children: Mutex::new(Vec::new()),
                shared: Arc::new(Shared {
                    events,
                    shut: Mutex::new(false),
                }),
                lines,
            }),
        }
    }

    /// A supervisor running `specs`, started in order.
    ///
    /// # Errors
    /// As [`Supervisor::add`]; the children started before the failure are shut down.
    pub async fn launch(
        specs: impl IntoIterator<Item = ChildSpec>,
        options: Options,
    ) -> Result<Self, Error> {
        let supervisor = Self::new(options);
        for spec in specs {
            if let Err(error) = supervisor.add(spec).await {
                supervisor.shutdown().await;
                return Err(error);
            }
        }
        Ok(supervisor)
    }

    /// Starts `spec` and supervises it from now on. Returns the pid of its first process.
    ///
    /// # Errors
    /// [`Error::Duplicate`] for a name in use, [`Error::Spawn`] when the first start fails
    /// (the child is then not added), [`Error::ShutDown`] after [`Supervisor::shutdown`].
    pub async fn add(&self, spec: ChildSpec) -> Result<u32, Error> {
        if *lock(&self.inner.shared.shut) {
            return Err(Error::ShutDown);
        }
        if lock(&self.inner.children)
            .iter()
            .any(|c| c.name == spec.name)
        {
            return Err(Error::Duplicate(spec.name));
        }
        let child = spec
            .command(self.inner.options.own_process_group)
            .spawn()
            .map_err(|source| Error::Spawn {
                name: spec.name.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        let state = Arc::new(Mutex::new(ChildStatus {
            name: spec.name.clone(),
            pid: Some(pid),
            held: false,
            restarts: 0,
            last_exit: None,
            started_at: Some(Instant::now()),
            last_error: None,
        }));
        let (commands, receive) = mpsc::unbounded_channel();
        let monitor = Monitor {
            spec: spec.clone(),
            options: self.inner.options.clone(),
            state: state.clone(),
            shared: self.inner.shared.clone(),
            lines: self.inner.lines.clone(),
            commands: receive,
        };
        monitor.emit(EventKind::Started { pid, restarts: 0 });
        let task = tokio::spawn(monitor.run(child));
        lock(&self.inner.children).push(ChildHandle {
            name: spec.name,
            state,
            commands,
            task: Some(task),
        });
        Ok(pid)
    }

    /// The children's names, in start order.
    pub fn names(&self) -> Vec<String> {
        lock(&self.inner.children)
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    /// A child's state now.
    pub fn status(&self, name: &str) -> Option<ChildStatus> {
        lock(&self.inner.children)
            .iter()
            .find(|c| c.name == name)
            .map(|c| lock(&c.state).clone())
    }

    /// The running process's pid of a child.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.status(name).and_then(|s| s.pid)
    }

    /// Every child's state, in start order.
    pub fn statuses(&self) -> Vec<ChildStatus> {
        lock(&self.inner.children)
            .iter()
            .map(|c| lock(&c.state).clone())
            .collect()
    }

    /// A receiver of every [`Event`] from now on (a receiver that falls more than 1024 events
    /// behind loses the oldest and is told so).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.shared.events.subscribe()
    }

    /// Sends SIGKILL to a running child; the supervisor restarts it (unless it is held down).
    /// Returns the pid killed.
    ///
    /// # Errors
    /// [`Error::UnknownChild`], [`Error::NotRunning`], [`Error::Signal`].
    pub fn kill(&self, name: &str) -> Result<u32, Error> {
        self.signal(name, Signal::Kill)
    }

    /// Sends SIGTERM to a running child; the supervisor restarts it once it exits (unless it
    /// is held down). Returns the pid signalled.
    ///
    /// # Errors
    /// [`Error::UnknownChild`], [`Error::NotRunning`], [`Error::Signal`].
    pub fn terminate(&self, name: &str) -> Result<u32, Error> {
        self.signal(name, Signal::Term)
    }

    fn signal(&self, name: &str, signal: Signal) -> Result<u32, Error> {
        let children = lock(&self.inner.children);
        let child = children
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::UnknownChild(name.to_owned()))?;
        // Signal under the state lock: the monitor clears the pid under it right after
        // reaping (see the module docs on pid reuse).
        let state = lock(&child.state);
        let pid = state
            .pid
            .ok_or_else(|| Error::NotRunning(name.to_owned()))?;
        send_signal(pid, signal).map_err(|source| Error::Signal {
            name: name.to_owned(),
            pid,
            source,
        })?;
        Ok(pid)
    }

    /// Holds a child down: SIGTERM, SIGKILL after [`Options::grace`], and no restart until
    /// [`Supervisor::start`]. Returns how the process ended (`None` when none was running).
    ///
    /// # Errors
    /// [`Error::UnknownChild`]; [`Error::ShutDown`] when the supervisor stopped meanwhile.
    pub async fn stop(&self, name: &str) -> Result<Option<ExitStatus>, Error> {
        let (reply, answer) = oneshot::channel();
        self.command(name, Command_::Stop(reply))?;
        answer.await.map_err(|_| Error::ShutDown)
    }

    /// Releases a child [`Supervisor::stop`] held down: it starts at once (watch
    /// [`Supervisor::events`] for its `Started`). Does nothing to a child not held.
    ///
    /// # Errors
    /// [`Error::UnknownChild`], [`Error::ShutDown`].
    pub fn start(&self, name: &str) -> Result<(), Error> {
        if *lock(&self.inner.shared.shut) {
            return Err(Error::ShutDown);
        }
        self.command(name, Command_::Start)
    }

    fn command(&self, name: &str, command: Command_) -> Result<(), Error> {
        let children = lock(&self.inner.children);
        let child = children
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::UnknownChild(name.to_owned()))?;
        child.commands.send(command).map_err(|_| Error::ShutDown)
    }

    /// Stops every child for good: SIGTERM to all at once, SIGKILL to those still up after
    /// [`Options::grace`]; returns when all have exited and their output is forwarded.
    /// Idempotent.
    pub async fn shutdown(&self) {
        *lock(&self.inner.shared.shut) = true;
        let tasks: Vec<JoinHandle<()>> = {
            let mut children = lock(&self.inner.children);
            children
                .iter_mut()
                .filter_map(|c| {
                    let _ = c.commands.send(Command_::Shutdown);
                    c.task.take()
                })
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// The task that owns one child: waits for its exits, restarts it, obeys commands.
struct Monitor {
    spec: ChildSpec,
    options: Options,
    state: Arc<Mutex<ChildStatus>>,
    shared: Arc<Shared>,
    lines: Option<mpsc::Sender<LogLine>>,
    commands: mpsc::UnboundedReceiver<Command_>,
}

/// What ended a running phase.
enum After {
    /// Restart (with backoff) unless held.
    Continue,
    /// The supervisor is gone or shut down.
    Finish,
}

impl Monitor {
    fn emit(&self, kind: EventKind) {
        let _ = self.shared.events.send(Event {
            name: self.spec.name.clone(),
            at: Instant::now(),
            time: SystemTime::now(),
            kind,
        });
    }

    fn held(&self) -> bool {
        lock(&self.state).held
    }

    fn set_held(&self, held: bool) {
        let changed = {
            let mut state = lock(&self.state);
            std::mem::replace(&mut state.held, held) != held
        };
        if changed {
            self.emit(if held {
                EventKind::Held
            } else {
                EventKind::Released
            });
        }
    }

    fn forward(
        &self,
        stream: Stream,
        reader: impl AsyncRead + Unpin + Send + 'static,
    ) -> JoinHandle<()> {
        let name = self.spec.name.clone();
        let output = self.options.output.clone();
        let lines = self.lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            let mut buffer = Vec::new();
            loop {
                buffer.clear();
                match reader.read_until(b'\n', &mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                while matches!(buffer.last(), Some(b'\n' | b'\r')) {
                    buffer.pop();
                }
                let line = LogLine {
                    name: name.clone(),
                    stream,
                    line: String::from_utf8_lossy(&buffer).into_owned(),
                };
                let delivered = match (&output, &lines) {
                    (Output::Parent, Some(lines)) => lines.send(line).await.is_ok(),
                    (Output::Capture(sink), _) => sink.send(line).is_ok(),
                    _ => true,
                };
                if !delivered {
                    break;
                }
            }
        })
    }

    async fn run(mut self, first: Child) {
        let mut child = Some(first);
        let mut exits_in_a_row = 0_u32;
        loop {
            if let Some(running) = child.take() {
                let (after, uptime) = self.supervise(running).await;
                if matches!(after, After::Finish) {
                    return;
                }
                if uptime >= self.options.backoff.reset_after {
                    exits_in_a_row = 0;
                }
            }
            if self.held() {
                // Held down: wait to be released.
                match self.commands.recv().await {
                    Some(Command_::Start) => {
                        self.set_held(false);
                        exits_in_a_row = 0;
                    }
                    Some(Command_::Stop(reply)) => {
                        let _ = reply.send(None);
                        continue;
                    }
                    Some(Command_::Shutdown) | None => return,
                }
            } else {
                exits_in_a_row = exits_in_a_row.saturating_add(1);
                let delay = self.options.backoff.delay(exits_in_a_row);
                self.emit(EventKind::RestartScheduled { delay });
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                tokio::select! {
                    () = &mut sleep => {}
                    command = self.commands.recv() => match command {
                        Some(Command_::Start) => {}
                        Some(Command_::Stop(reply)) => {
                            self.set_held(true);
                            let _ = reply.send(None);
                        }
                        Some(Command_::Shutdown) | None => return,
                    },
                }
                if self.held() {
                    continue;
                }
            }
            if *lock(&self.shared.shut) {
                return;
            }
            match self.spec.command(self.options.own_process_group).spawn() {
                Ok(spawned) => {
                    let pid = spawned.id().unwrap_or_default();
                    let restarts = {
                        let mut state = lock(&self.state);
                        state.restarts += 1;
                        state.pid = Some(pid);
                        state.started_at = Some(Instant::now());
                        state.last_error = None;
                        state.restarts
                    };
                    self.emit(EventKind::Started { pid, restarts });
                    child = Some(spawned);
                }
                Err(error) => {
                    let error = error.to_string();
                    lock(&self.state).last_error = Some(error.clone());
                    self.emit(EventKind::SpawnFailed { error });
                }
            }
        }
    }

    /// Runs one process to its end, obeying commands meanwhile.
    async fn supervise(&mut self, mut child: Child) -> (After, Duration) {
        let started = Instant::now();
        // Held, never written: its closing when this process dies is the child's signal.
        let _stdin = child.stdin.take();
        let mut forwarders = Vec::new();
        if let Some(out) = child.stdout.take() {
            forwarders.push(self.forward(Stream::Stdout, out));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(self.forward(Stream::Stderr, err));
        }
        let mut waiting: Vec<oneshot::Sender<Option<ExitStatus>>> = Vec::new();
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut after = After::Continue;
        let status = loop {
            let deadline = kill_at;
            tokio::select! {
                status = child.wait() => break status,
                command = self.commands.recv() => {
                    let stopping = match command {
                        Some(Command_::Stop(reply)) => {
                            self.set_held(true);
                            waiting.push(reply);
                            true
                        }
                        Some(Command_::Start) => {
                            // Released while still stopping: restarted once it exits.
                            self.set_held(false);
                            false
                        }
                        Some(Command_::Shutdown) => {
                            self.set_held(true);
                            after = After::Finish;
                            true
                        }
                        None => {
                            // Every handle is gone: no one to stop gracefully for.
                            after = After::Finish;
                            let _ = child.start_kill();
                            false
                        }
                    };
                    if stopping && kill_at.is_none() {
                        self.term(&child);
                        kill_at = Some(tokio::time::Instant::now() + self.options.grace);
                    }
                }
                () = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = child.start_kill();
                    kill_at = None;
                }
            }
        };
        let uptime = started.elapsed();
        let status = status.ok();
        {
            let mut state = lock(&self.state);
            state.pid = None;
            state.started_at = None;
            if status.is_some() {
                state.last_exit = status;
            }
        }
        for forwarder in forwarders {
            let abort = forwarder.abort_handle();
            if tokio::time::timeout(OUTPUT_DRAIN, forwarder).await.is_err() {
                abort.abort();
            }
        }
        if let Some(status) = status {
            self.emit(EventKind::Exited { status, uptime });
        }
        for reply in waiting {
            let _ = reply.send(status);
        }
        (after, uptime)
    }

    fn term(&self, child: &Child) {
        // Only this task reaps the child (in `wait`), so the pid is still the child's here.
        if let Some(pid) = child.id() {
            let _ = send_signal(pid, Signal::Term);
        }
    }
}
