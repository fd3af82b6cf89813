"""Shared helpers of the beckon benchmark (stdlib only): process CPU and RSS from /proc,
machine CPU, beckon status counters, medians."""
import json
import os
import statistics
import subprocess

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int) -> int:
    """utime + stime of PID (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # fields 14, 15 of stat(5)


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_ticks():
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


class CpuProbe:
    """CPU seconds used by some processes, and the machine's busy share, between start() and stop()."""

    def __init__(self, pids):
        self.pids = {k: int(v) for k, v in pids.items() if v}

    def _sample(self):
        s = {}
        for k, pid in self.pids.items():
            try:
                s[k] = proc_ticks(pid)
            except OSError:
                s[k] = None
        return s, machine_ticks()

    def start(self):
        self.t0 = _now()
        self.s0, self.m0 = self._sample()

    def stop(self):
        t1 = _now()
        s1, m1 = self._sample()
        wall = max(t1 - self.t0, 1e-9)
        out = {"wall_s": round(wall, 3)}
        for k in self.pids:
            if self.s0.get(k) is not None and s1.get(k) is not None:
                secs = (s1[k] - self.s0[k]) / CLK_TCK
                out[f"{k}_cpu_s"] = round(secs, 3)
                out[f"{k}_cpu_pct"] = round(100.0 * secs / wall, 1)  # % of one core
            try:
                out[f"{k}_rss_mb"] = round(proc_rss_kb(self.pids[k]) / 1024.0, 1)
            except OSError:
                pass
        busy, total = m1[0] - self.m0[0], m1[1] - self.m0[1]
        out["machine_busy_pct"] = round(100.0 * busy / total, 1) if total else None
        return out


def _now():
    import time
    return time.monotonic()


def beckon_status(beckon: str) -> dict:
    out = subprocess.run([beckon, "status", "--json"], capture_output=True, timeout=30, check=True)
    return json.loads(out.stdout)


def counters(beckon: str) -> dict:
    return beckon_status(beckon)["counters"]


def delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in b if isinstance(b.get(k), int)}


def median(xs):
    return statistics.median(xs) if xs else None


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


PREFIX = os.environ.get("BK_PREFIX", "bk-bench")


def _ns_out(ns: str, *cmd: str) -> str:
    try:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _snmp_tcp(ns: str) -> dict:
    lines = [ln.split() for ln in _ns_out(ns, "cat", "/proc/net/snmp").splitlines() if ln.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]))) if len(lines) >= 2 else {}


def net_snapshot() -> dict:
    """Evidence counters of the lab: packets the server kernel dropped on beckon's TUN (queue
    full: beckon did not read fast enough), packets each router's forward chain dropped as
    conntrack INVALID, RSTs each router's own TCP stack sent, retransmissions of each camera."""
    s = {}
    try:
        out = subprocess.run(["ip", "-n", f"{PREFIX}-srv", "-s", "-j", "link", "show", "beckon0"],
                             capture_output=True, text=True, timeout=10).stdout
        st = json.loads(out)[0]["stats64"]
        s["server_tun_tx_dropped"] = st["tx"]["dropped"]
        s["server_tun_to_beckon_packets"] = st["tx"]["packets"]    # kernel -> beckon (reads)
        s["server_tun_from_beckon_packets"] = st["rx"]["packets"]  # beckon -> kernel (writes)
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError):
        pass
    for site in ("a", "b"):
        try:
            d = json.loads(_ns_out(f"{PREFIX}-nat-{site}", "nft", "-j", "list", "chain", "inet",
                                   "bk_filter", "forward"))
            for it in d["nftables"]:
                r = it.get("rule")
                if r and r.get("comment") == "ct-invalid":
                    for e in r["expr"]:
                        if "counter" in e:
                            s[f"nat_{site}_invalid_dropped"] = e["counter"]["packets"]
        except (ValueError, KeyError):
            pass
        t = _snmp_tcp(f"{PREFIX}-nat-{site}")
        if t:
            s[f"nat_{site}_own_rsts"] = t.get("OutRsts", 0)
        t = _snmp_tcp(f"{PREFIX}-cam-{site}")
        if t:
            s[f"cam_{site}_retrans_segs"] = t.get("RetransSegs", 0)
    return s


def perf_start(pid: int, secs: float, path: str):
    """Start `perf record -g` on PID for SECS seconds (None if perf is missing)."""
    import shutil
    if not shutil.which("perf"):
        return None
    return subprocess.Popen(["perf", "record", "-q", "-F", "499", "-g", "-p", str(pid), "-o", path,
                             "--", "sleep", str(secs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_lines(path: str, *args: str):
    p = subprocess.run(["perf", "report", "-i", path, "--stdio", "-g", "none", *args],
                       capture_output=True, text=True, timeout=120)
    rows = []
    for ln in p.stdout.splitlines():
        parts = ln.split()
        if not parts or not parts[0].endswith("%"):
            continue
        try:
            rows.append((float(parts[0][:-1]), parts))
        except ValueError:
            continue
    return rows


def perf_summary(path: str, top: int = 8) -> dict:
    """Where the recorded process spent its samples: share per DSO (kernel vs beckon), the
    top self-time symbols, and the inclusive share of the syscalls that move packets."""
    if not os.path.exists(path):
        return {}
    out = {"dso": {}, "top_self": [], "inclusive": {}}
    for pct, parts in _perf_lines(path, "--no-children", "--sort", "dso"):
        out["dso"][parts[1]] = pct
    for pct, parts in _perf_lines(path, "--no-children", "--sort", "dso,sym")[:top]:
        out["top_self"].append([pct, " ".join(parts[1:])])
    want = {"ksys_write": "write (TUN, control)", "do_writev": "writev (TUN with offload header)", "ksys_read": "read (TUN)",
            "__sys_sendto": "send (to client socket)", "__sys_recvfrom": "recv (client socket)",
            "tun_get_user": "TUN write path", "tun_do_read": "TUN read path"}
    for pct, parts in _perf_lines(path, "--children", "--sort", "sym"):
        sym = parts[-1]
        if sym in want and sym not in out["inclusive"]:
            out["inclusive"][sym] = pct
    return out
