#!/usr/bin/env python3
"""Where a process's CPU and context switches go, by thread name, per order.

trellis names each SQLite connection's thread after its database file (`orders-saga#3`), so
grouping threads by name (the `#N` and `-N` numbering stripped) shows which database's
statements cost what. bench/shop/run.sh calls it with THREADS=1:
    threads.py PID BEFORE.json            (a snapshot)
    threads.py diff BEFORE.json AFTER.json ORDERS   (a table: CPU ms and switches per order)
Threads that ended between the snapshots are not counted. BY_THREAD=1 keeps one row per
thread instead of one per name."""
import json, os, re, sys
hz = os.sysconf("SC_CLK_TCK")
def snap(pid):
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            status = open(f"/proc/{pid}/task/{tid}/status").read()
        except OSError:
            continue
        comm = stat[stat.index("(")+1:stat.rindex(")")]
        f = stat[stat.rindex(")")+2:].split()
        cpu = (int(f[11]) + int(f[12])) / hz
        ctx = sum(int(m) for m in re.findall(r"ctxt_switches:\s+(\d+)", status))
        out[tid] = [comm, cpu, ctx]
    return out
if sys.argv[1] == "diff":
    a, b = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
    n = int(sys.argv[4])
    groups = {}
    for tid, (comm, cpu, ctx) in b.items():
        c0, x0 = (a[tid][1], a[tid][2]) if tid in a else (0, 0)
        g = comm if os.environ.get("BY_THREAD") else re.sub(r"#\d+$", "", comm)
        g = re.sub(r"-\d+$", "", g)
        e = groups.setdefault(g, [0, 0, 0])
        e[0] += cpu - c0; e[1] += ctx - x0; e[2] += 1
    tot = [sum(v[0] for v in groups.values()), sum(v[1] for v in groups.values())]
    print(f"{'threads':24} {'n':>3} {'CPU ms/order':>12} {'ctx/order':>10}")
    for g, (cpu, ctx, k) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"{g:24} {k:3} {1000*cpu/n:12.3f} {ctx/n:10.1f}")
    print(f"{'total':24} {'':3} {1000*tot[0]/n:12.3f} {tot[1]/n:10.1f}")
else:
    json.dump(snap(sys.argv[1]), open(sys.argv[2], "w"))
