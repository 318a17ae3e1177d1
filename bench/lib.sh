# Shared by the bench scripts (source it): what a running process has used so far, read from
# /proc, so each script reports CPU, memory and thread hand-offs the same way.

# Resident memory of a process, MB.
rss_mb() { awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

# Context switches of a process's live threads so far (voluntary + involuntary): each thread
# hand-off (a statement sent to sqlx's SQLite thread, its answer back) is one or two of them.
ctx_switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^(non)?voluntary_ctxt_switches:/ { n += $2 } END { print n + 0 }'
}
