//! The process and runtime basics every scrape carries: CPU, memory, file descriptors and
//! threads read from `/proc/self` (Linux; nothing elsewhere), and the Tokio runtime's worker
//! and task counts. Written straight into the exposition text at scrape time, the way
//! Prometheus's own client libraries collect them, so they cost nothing between scrapes and
//! keep their standard names and types (`process_cpu_seconds_total` is a float counter, which
//! the `metrics` facade's integer counters cannot hold).

use std::fmt::Write as _;

/// Prometheus's clients assume this for `/proc` tick counts (`USER_HZ`, 100 on every Linux
/// architecture Rust targets).
const TICKS_PER_SECOND: f64 = 100.0;

/// One metric family with a single, unlabelled sample.
struct Sample {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: f64,
}

/// Appends the process and runtime families to `out` in the text exposition format.
pub(super) fn render_into(out: &mut String) {
    let mut samples = Vec::new();
    process_samples(&mut samples);
    runtime_samples(&mut samples);
    for sample in samples {
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n",
            name = sample.name,
            help = sample.help,
            kind = sample.kind,
            value = sample.value,
        );
    }
}

fn process_samples(samples: &mut Vec<Sample>) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(stat) = ProcStat::parse(&stat) else {
        return;
    };
    samples.push(Sample {
        name: "process_cpu_seconds_total",
        kind: "counter",
        help: "Total user and system CPU time spent in seconds.",
        value: (stat.utime_ticks + stat.stime_ticks) as f64 / TICKS_PER_SECOND,
    });
    samples.push(Sample {
        name: "process_virtual_memory_bytes",
        kind: "gauge",
        help: "Virtual memory size in bytes.",
        value: stat.vsize_bytes as f64,
    });
    samples.push(Sample {
        name: "process_threads",
        kind: "gauge",
        help: "Number of OS threads in the process.",
        value: stat.threads as f64,
    });
    if let Some(boot) = std::fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(boot_time_seconds)
    {
        samples.push(Sample {
            name: "process_start_time_seconds",
            kind: "gauge",
            help: "Start time of the process since unix epoch in seconds.",
            value: boot as f64 + stat.start_ticks as f64 / TICKS_PER_SECOND,
        });
    }
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(resident_bytes)
    {
        samples.push(Sample {
            name: "process_resident_memory_bytes",
            kind: "gauge",
            help: "Resident memory size in bytes.",
            value: rss as f64,
        });
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        samples.push(Sample {
            name: "process_open_fds",
            kind: "gauge",
            help: "Number of open file descriptors.",
            value: entries.count() as f64,
        });
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .as_deref()
        .and_then(max_open_files)
    {
        samples.push(Sample {
            name: "process_max_fds",
            kind: "gauge",
            help: "Maximum number of open file descriptors.",
            value: max as f64,
        });
    }
}

fn runtime_samples(samples: &mut Vec<Sample>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let metrics = runtime.metrics();
    samples.push(Sample {
        name: "trellis_runtime_workers",
        kind: "gauge",
        help: "Worker threads of the Tokio runtime that serves /metrics.",
        value: metrics.num_workers() as f64,
    });
    samples.push(Sample {
        name: "trellis_runtime_alive_tasks",
        kind: "gauge",
        help: "Tasks alive in the Tokio runtime (spawned, not yet finished).",
        value: metrics.num_alive_tasks() as f64,
    });
    samples.push(Sample {
        name: "trellis_runtime_global_queue_depth",
        kind: "gauge",
        help: "Tasks waiting in the Tokio runtime's global (injection) queue.",
        value: metrics.global_queue_depth() as f64,
    });
    #[cfg(target_has_atomic = "64")]
    samples.push(Sample {
        name: "trellis_runtime_busy_seconds_total",
        kind: "counter",
        help: "Seconds the Tokio runtime's workers spent busy, summed over workers.",
        value: (0..metrics.num_workers())
            .map(|worker| metrics.worker_total_busy_duration(worker).as_secs_f64())
            .sum(),
    });
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    utime_ticks: u64,
    stime_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize_bytes: u64,
}

impl ProcStat {
    /// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
    /// parentheses, so the fields are counted from after its last `)`.
    fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        // `rest` starts at field 3 (the state): field n is at index n - 3.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            vsize_bytes: field(23)?,
        })
    }
}

/// `btime` of `/proc/stat`: when the machine booted, in seconds since the Unix epoch.
fn boot_time_seconds(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// `VmRSS` of `/proc/self/status`, in bytes (the file says kB, meaning KiB).
fn resident_bytes(text: &str) -> Option<u64> {
    let value = text.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit on open files in `/proc/self/limits` (`unlimited` gives `None`).
fn max_open_files(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let text = "4242 (tokio (rt) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 7 0 1234 5678 99";
        let stat = ProcStat::parse(text).expect("parses");
        assert_eq!(
            stat,
            ProcStat {
                utime_ticks: 250,
                stime_ticks: 50,
                threads: 7,
                start_ticks: 1234,
                vsize_bytes: 5678,
            }
        );
    }

    #[test]
    fn status_limits_and_boot_time_are_read_in_their_units() {
        // VmRSS is in KiB; the soft open-files limit is the first number; btime is seconds.
        assert_eq!(
            resident_bytes("Name:\tx\nVmRSS:\t    2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            boot_time_seconds("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[tokio::test]
    async fn a_render_inside_a_runtime_has_the_runtime_and_on_linux_the_process_families() {
        // Every family gets HELP and TYPE lines; the process ones exist where /proc does.
        let mut out = String::new();
        render_into(&mut out);
        assert!(
            out.contains("# TYPE trellis_runtime_alive_tasks gauge\ntrellis_runtime_alive_tasks "),
            "{out}"
        );
        if std::path::Path::new("/proc/self/stat").exists() {
            for family in [
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_open_fds",
                "process_start_time_seconds",
            ] {
                assert!(
                    out.contains(&format!("# HELP {family} ")),
                    "{family}: {out}"
                );
            }
        }
    }
}
