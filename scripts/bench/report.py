#!/usr/bin/python3
"""Render the beckon benchmark's results (RUN/*.json from scripts/bench.sh) as markdown:
the method first, then one table of ratios measured side by side, then notes."""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

RUN = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(RUN, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def f1(x, unit=""):
    return "–" if x is None else f"{x:.1f}{unit}"


def f2(x, unit=""):
    return "–" if x is None else f"{x:.2f}{unit}"


def pct(x):
    return "–" if x is None else f"{100 * x:.3g} %"


def met(ok):
    return "–" if ok is None else ("yes" if ok else "**no**")


meta = load("meta.json") or {}
s0, s20 = load("setup-0.json"), None
for f in sorted(glob.glob(os.path.join(RUN, "setup-*.json"))):
    d = load(os.path.basename(f))
    if d and d.get("delay_ms", 0) > 0:
        s20 = d
t1, t8 = load("throughput-1.json"), load("throughput-8.json")
twan = load("throughput-wan.json")
sd, sa = load("streams-direct.json"), load("streams-assisted.json")
sl = load("streams-direct-liberal.json")
tl1, tl8 = load("throughput-liberal-1.json"), load("throughput-liberal-8.json")
udp = load("udp.json")
bg = load("background.json") or {}
lines = []
out = lines.append

out(f"## beckon benchmark: {meta.get('date', '?')}, {meta.get('cores', '?')} cores "
    f"({meta.get('cpu', '?')}), kernel {meta.get('kernel', '?')}, {meta.get('git', 'beckon ?')}"
    + (" (--quick)" if meta.get("quick") else ""))
out("")
out("### Method")
out("")
out("`scripts/bench.sh` (root) builds beckon (`cargo build --release`; or takes `--binary`), runs a "
    "private copy of the binary, and builds **one** lab "
    "(`scripts/lab/lab.sh up bk-bench --dnat-a 8080:80 --dnat-b 8080:80 --dnat-b 8443:trigger:8443 "
    "--dnat-b 8444:trigger:8444`): a server namespace "
    "(203.0.113.1, beckon's `public_ip` 203.0.113.100) and two camera sites, each behind its own "
    "**strict Linux NAT** (nftables masquerade + `ct state invalid drop`, default conntrack "
    "sysctls, as OpenWrt), a trigger on each LAN. One beckon server serves both sites: "
    f"site a with direct TCP (its site profile chose `{meta.get('strategy', '?')}`), site b with "
    "`direct_tcp = false` (assisted path: the trigger relays the bytes). The **reference** for each "
    "site is what beckon replaces: a static port-forward on the same router (`--dnat-a/-b "
    "8080:80`: nft `dnat` in chain prerouting of `ip bk_nat`, 203.0.113.2/.3:8080 → camera "
    "198.18.1.10:80), reached by the same client from the same namespace; packets to the camera "
    "cross the same NAT, forward chain and conntrack either way. All clients run in the server "
    "namespace, beckon's exposures listen on 127.0.0.1. Reference and beckon runs alternate "
    "within each measurement, so slow drift of the host hits both.")
out("")
out(f"* **Setup**: `curl -w %{{time_starttransfer}}` (from the start of the client's connection to "
    f"the first byte of the camera's `GET /`), median of {s0['n'] if s0 else '?'} per target, "
    "targets interleaved. Run once with no WAN delay and once with "
    f"{s20['delay_ms'] if s20 else '?'} ms one-way delay between the server and both routers "
    "(`lab.sh delay`). The host kernel has no `sch_netem`, so the delay is a userspace L2 relay "
    "(Python) in the WAN switch: fine for latency, but it caps WAN throughput (the port-forward measured 53-61 MB/s through it), so "
    "it is switched off (server port back on the plain bridge) for everything after the setup "
    "measurement. RTT = median `ping` RTT server → router. Extra round trips = (beckon − "
    "port-forward) / RTT. The port-forward's first byte costs 2 RTT (TCP handshake + request); "
    "steered-resync opens the camera connection in 1 to 3 sequential WAN round trips through "
    "the trigger (server log `direct TCP connection up … setup_ms … round_trips=N timed_steps=M`): "
    "each of its two steered packets leaves either after the trigger's packet came back through "
    "the NAT (a round trip) or, timed, 8 ms after the indication (`timed_steps`, only where the site's round trip is longer than that; step 4 always, "
    "steps 2+3 where the NAT kept the camera's port at the site's last steered connection, so "
    "the mapping is predicted). Site a's NAT keeps ports, so on the 20 ms WAN: 1 round trip + "
    "2 × 8 ms, then the request's round trip. The assisted "
    "path needs 1 RTT to open the camera connection over the trigger's assist link (the trigger "
    "connects on its LAN), then the request (2 RTT). `direct, pre-opened`: the same camera "
    "through a second exposure with `warm = 1`: beckon keeps one direct connection to the camera "
    "open before any client comes (renewed every 12-15 s, refilled in the background after a client "
    "took it), so the client's first byte needs only the request's round trip (1 RTT); a client "
    "arriving while the refill is still under way gets a fresh steered connection.")
out(f"* **Throughput**: `curl /bulk?bytes=N` from the camera's `cam_http.py` (Python, 64 KiB "
    f"writes), N = {t1['bytes_per_stream'] // 1_000_000 if t1 else '?'} MB (1 stream, median of "
    f"{len([r for r in t1['runs'] if r['target'] == 'direct']) if t1 else '?'}) and 8 parallel "
    f"streams of {t8['bytes_per_stream'] // 1_000_000 if t8 else '?'} MB; MB/s = all bytes / wall "
    "time. The limit is the same transfer kernel-to-kernel through the same NAT via the "
    "port-forward. No WAN delay (relay out of the path). Every transfer must arrive complete. "
    f"The cameras send with TCP congestion control **{meta.get('camera_cc', '?')}** "
    "(`BENCH_CAMERA_CC`; cubic is Linux's default and what camera firmware runs); everything else "
    f"(triggers, relays, clients, beckon's client sockets) with the host's default, "
    f"{meta.get('host_cc', '?')}. It sets the port-forward's pace: a BBR camera paces itself to its "
    "own estimate of the path (on this project's lab machine the port-forward measured 1.1-1.9 GB/s "
    "with one stream from bbr cameras and 4.3-4.6 GB/s from cubic ones, and every path's ratio was higher with bbr). "
    + (f"Once more, 1 stream of {twan['bytes_per_stream'] // 1_000_000} MB (median of "
       f"{len([r for r in twan['runs'] if r['target'] == 'direct'])}), through the "
       "delayed WAN of the setup measurement (at least 11 s after the delay came on, so yamux has "
       "re-measured the assist link's round trip): this shows whether the windows carry the path "
       "(a window of W bytes carries at most W per round trip). There the userspace relay is the "
       "limit of the port-forward too. " if twan else "")
    + "`direct (rate_mbit = 10000)` is the same camera through a "
    "second exposure that asks for windows for 10 Gbit/s (its window also covers beckon's 2 ms "
    "service allowance, so on the LAN-like path it is ≈ 2.5 MB instead of the 2 MiB floor). The "
    "**kernel-socket relay** is a second reference, not beckon: `socat -b 262144` in the server's "
    "namespace ends the camera's TCP connection (through the same port-forward) and sends the bytes "
    "on to the client, as beckon's direct path does with its own stack; the difference between the "
    "port-forward and the relay is what terminating and re-sending costs on this machine. "
    "The **relay pairs** are two more references, of the assisted path's shape, on site b: one socat "
    "on the trigger host (it ends the camera's connection) and one in the server's namespace (it "
    "serves the client), the bytes crossing the NAT between them (through the site's port-forward "
    "8443/8444 to the trigger host: which side dials does not change the work per byte); "
    "`relay pair` with plain TCP between them, `relay pair with TLS` with TLS 1.3, AES-128-GCM "
    "(OpenSSL; one TLS connection per client, no multiplexing). That is the least any reverse "
    "tunnel (ssh -R, a TLS tunnel) does per byte: two relays and, with TLS, encryption. "
    "Each repetition runs every target once, in turn; the ratio is of the medians, and the range "
    "beside it is the ratios of the single repetitions (how much this shared machine moves). "
    "**Work per GB** (notes): machine busy × cores × wall time / GB delivered, median of the runs; "
    "where the machine is saturated (8 streams), throughput is inversely proportional to it.")
out("* **Concurrent streams**: a paced camera service (`scripts/bench/paced_cam.py`, one asyncio "
    "process in each camera namespace) sends every accepted connection 4 Mbit/s (500 kB/s in "
    "50 kB slices every 100 ms, spread over the tick; like an encoder it drops a slice rather "
    "than queue more than 1 s). One client process (`scripts/bench/streams.py`) opens N "
    "connections to one exposure (≤ 32 waiting for their first byte at once), waits 2 s, then "
    "counts each stream's bytes per second for 10 s. N holds if no connection was lost and every "
    "stream got ≥ 90 % of 4 Mbit/s in every sliding 5 s window (1 s steps; so a stall of "
    "≈ 0.5 s fails it, jitter of a few 100 ms does not). N doubles from 50 until it fails or "
    "the phase's time budget is used, then two bisection steps. Server CPU = utime+stime delta "
    "of the beckon server process over the measured window (% of one core), RSS = VmRSS at its end. "
    "The server runs with its overload guard on (the default): past the host's limit it resets new "
    "clients while it drops camera packets, so such a level fails (not all N came up); the row "
    "lists, for each such level, the clients served and refused and whether every served stream "
    "held. Each level starts once the server's status no longer says `overloaded` (at most 120 s).")
out("* **Trigger share**: bytes the triggers injected (`bytes_injected_by_triggers`, trigger "
    "packets incl. IP headers, as confirmed by the triggers) per payload byte beckon delivered "
    "directly (`tcp_bytes_direct`, or UDP `bytes_direct_to/from_cameras`), as counter deltas "
    "of `beckon status --json` over each phase. On the assisted path the trigger carries every "
    "byte (`tcp_bytes_assisted`).")
out("* **UDP mappings**: one client process opens F UDP sockets to one UDP exposure (camera port "
    "5060, `cam_udp.py`); each is its own flow, so its own server port and its own NAT mapping "
    "(conntrack entry) at site a's router: F emulated cameras as seen from the server and the "
    "NAT, though all are answered by one camera and announced by one trigger. Round 1: each "
    "flow's first datagram goes to the camera inside a trigger packet (≤ 200 outstanding, "
    "retried after 2 s, 3 tries); round 2: one more datagram per mapped flow (one retry), which goes "
    "directly to the mapping.")
b0, b1 = bg.get("busy_before_pct"), bg.get("busy_after_pct")
dur = (load("duration.json") or {}).get("duration_s")
host = (f"* **Host**: everything (clients, Python camera services, routers, triggers, beckon) shares "
        f"the same {meta.get('cores', '?')} cores, so absolute numbers are low and the ratios are what "
        "counts. CPU % below is of one core (from `/proc/PID/stat`), \"machine\" is the busy share of "
        "all cores (`/proc/stat`).")
if b0 is not None:
    host += (f" Host CPU busy with nothing of the benchmark running: {b0:.0f} % before"
             + (f", {b1:.0f} % after" if b1 is not None else "") + " the run"
             + (" — other work was running on the host, so CPU-bound results are pessimistic."
                if max(b0, b1 or 0) > 15 else "."))
if dur:
    host += f" The run took {dur // 60} min {dur % 60} s."
out(host)
out("")
out("### Results")
out("")
out("| measure | beckon | port-forward (reference) | beckon vs reference | target | met |")
out("|---|---|---|---|---|---|")


def setup_rows(s):
    if not s:
        out("| setup | not measured | | | | |")
        return
    m, rtt, d = s["median_ms"], s["rtt_ms"], s["delay_ms"]
    for path, ref in (("direct", "dnat-a"), ("direct-warm", "dnat-a"), ("assisted", "dnat-b")):
        b, r = m.get(path), m.get(ref)
        if b is None or r is None:
            out(f"| setup {path}, {d} ms delay | failed ({s['errors']}) | | | | |")
            continue
        extra = (b - r) / rtt if rtt else None
        label = {"direct": "direct (steered-resync)", "direct-warm": "direct, pre-opened (`warm = 1`)"}.get(path, "assisted")
        detail = ""
        if path == "direct-warm":
            detail = f"; {s.get('warm_connections', '?')} of {s['ok'].get(path, 0)} served by a pre-opened connection"
        if path == "direct":
            detail = (f"; server: setup {f1(s.get('server_setup_ms_median'))} ms, "
                      f"round_trips {','.join(map(str, s.get('server_round_trips') or [])) or '?'}, "
                      f"timed_steps {','.join(map(str, s.get('server_timed_steps') or [])) or '?'}")
        if d > 0:
            diff = f"{b - r:+.1f} ms = **{extra:+.2f} RTT** (RTT {rtt:.1f} ms)"
            ok = extra <= 1.0
            target = "≤ +1 RTT"
        else:
            diff = f"{b - r:+.2f} ms (RTT {rtt:.2f} ms: processing, not round trips)"
            ok, target = None, "–"
        n_ok = s["ok"].get(path, 0)
        out(f"| setup, {label}, {d} ms one-way delay: time to first byte, median of {n_ok}"
            f"{detail} | {b:.2f} ms | {r:.2f} ms | {diff} | {target} | {met(ok)} |")


setup_rows(s0)
setup_rows(s20)


TPUT_PAIRS = (("direct", "dnat-a"), ("direct-rate", "dnat-a"), ("assisted", "dnat-b"), ("relay", "dnat-a"),
              ("relay-pair", "dnat-b"), ("tls-pair", "dnat-b"))
TPUT_NAMES = {"direct": "direct (`rate_mbit` 128, the default)", "direct-rate": "direct (`rate_mbit = 10000`)",
              "relay": "kernel-socket relay (socat, not beckon: a second reference)",
              "relay-pair": "relay pair, plain TCP (socat on the trigger host and the server, not beckon: "
                            "the assisted path's shape)",
              "tls-pair": "relay pair with TLS (socat + OpenSSL, AES-128-GCM, not beckon: a reverse tunnel's work)"}
# paths that are not beckon: shown beside the port-forward, no target
REFERENCES = ("relay", "relay-pair", "tls-pair")


def rep_ratios(t, path, ref, k):
    """The ratio of each repetition (every target runs once per repetition, in turn): how much
    the median ratio moves on this machine."""
    by_rep = {}
    for x in t.get("runs", []):
        if x["streams"] == k and x["complete"]:
            by_rep.setdefault(x["rep"], {})[x["target"]] = x["MBps"]
    return [d[path] / d[ref] for d in by_rep.values() if d.get(path) and d.get(ref)]


def tput_rows(t, k, only=("direct", "direct-rate", "assisted", *REFERENCES), tag="", names=TPUT_NAMES):
    if not t:
        out(f"| throughput, {k} stream(s){tag} | not measured | | | | |")
        return
    sm = t.get("summary", {})
    for path, ref in TPUT_PAIRS:
        if path not in only:
            continue
        b, r = sm.get(f"{path}/{k}"), sm.get(f"{ref}/{k}")
        if not b or not r:
            continue
        ratio = (b["MBps"] / r["MBps"]) if b["MBps"] and r["MBps"] else None
        bad, runs = b.get("incomplete_runs", 0), b.get("runs", 1)
        if b["complete"]:
            inc = ""
        elif bad < runs:
            inc = (f" (**{bad} of {runs} runs cut short** by a reset connection; MB/s is the median of the "
                   "complete runs)")
        else:
            inc = (f" (**transfers cut short** by reset connections in every run: {b.get('bytes_got', 0) / 1e6:.0f} of "
                   f"{b.get('bytes_expected', 0) / 1e6:.0f} MB arrived)")
        cpu = b.get("cpu", {})
        extra = f"; machine {f1(b.get('machine_busy_pct'))} % busy"
        if path not in REFERENCES:
            extra += f", server CPU {f1(b.get('server_cpu_pct'))} %"
        if path == "assisted":
            extra += f", trigger CPU {f1(cpu.get('trigger_b_cpu_pct'))} %"
        label = (names or {}).get(path, path)
        target, ok = ("–", "–") if path in REFERENCES else ("≥ 0.8", met(ratio is not None and ratio >= 0.8 and b["complete"]))
        reps = rep_ratios(t, path, ref, k)
        spread = f" (repetitions {min(reps):.2f}–{max(reps):.2f})" if len(reps) > 1 else ""
        out(f"| throughput, {label}{tag}, {k} stream{'s' if k > 1 else ''}{extra}{inc} | "
            f"{f1(b['MBps'])} MB/s | {f1(r['MBps'])} MB/s | ratio **{f2(ratio)}**{spread} | {target} | {ok} |")


tput_rows(t1, 1)
tput_rows(t8, 8)
if twan:
    wan_ms = s20["delay_ms"] if s20 else "?"
    tput_rows(twan, 1, only=("direct", "direct-rate", "assisted"), tag=f" through the {wan_ms} ms WAN")


def level_paths(label, n):
    """(direct, assisted) connections opened at one stream level, from the status snapshots."""
    try:
        a = json.load(open(os.path.join(RUN, f"streams-{label}-{n}.c0.json")))["counters"]
        b = json.load(open(os.path.join(RUN, f"streams-{label}-{n}.c1.json")))["counters"]
    except (OSError, ValueError, KeyError):
        return None
    return (b["tcp_connections_direct"] - a["tcp_connections_direct"],
            b["tcp_connections_assisted"] - a["tcp_connections_assisted"])


def refused_overloaded(path, n):
    """TCP clients the server's overload guard refused during level N (None if not known)."""
    a, b = load(f"streams-{path}-{n}.c0.json"), load(f"streams-{path}-{n}.c1.json")
    if not a or not b:
        return None
    key = "tcp_clients_refused_overloaded"
    return b["counters"].get(key, 0) - a["counters"].get(key, 0)


def guarded_levels(path):
    """Levels where the overload guard refused clients: (N, served, refused, served held, worst)."""
    rows = []
    for f in sorted(glob.glob(os.path.join(RUN, f"streams-{path}-[0-9]*.c0.json"))):
        n = int(f.rsplit("-", 1)[1].split(".")[0])
        refused, lvl = refused_overloaded(path, n), load(f"streams-{path}-{n}.json")
        if refused and lvl:
            held = lvl["streams_below_keep"] == 0 and lvl["lost"] == 0
            rows.append((n, lvl["up"], refused, held, lvl["worst_window_ratio"]))
    return sorted(rows)


def streams_row(s, path, title=None):
    title = title or path
    if not s:
        out(f"| concurrent 4 Mbit/s streams, {title} | not measured | | | | |")
        return
    n = s["max_ok"]
    lvl = load(f"streams-{path}-{n}.json") if n else None
    bad = load(f"streams-{path}-{s['first_stall']}.json") if s.get("first_stall") else None
    cpu = (lvl or {}).get("cpu", {})
    desc = f"largest N with no stall: **{n}**"
    paths = level_paths(path, n) if n else None
    if paths and path.startswith("direct"):
        d_, a_ = paths
        desc += " (all direct)" if a_ == 0 else f" ({d_} direct, **{a_} fell back to assisted**)"
    if lvl:
        desc += (f"; at N={n}: server CPU {f1(cpu.get('server_cpu_pct'))} % of a core, RSS "
                 f"{f1(cpu.get('server_rss_mb'))} MB")
        if path == "assisted":
            tb = cpu.get("trigger_b_cpu_pct")
            desc += f", trigger CPU {f1(tb)} %, RSS {f1(cpu.get('trigger_b_rss_mb'))} MB"
        desc += f", {lvl['aggregate_MBps']} MB/s total, machine {f1(cpu.get('machine_busy_pct'))} % busy"
    if bad:
        refused = refused_overloaded(path, bad["n"])
        desc += (f"; N={bad['n']} failed: {bad['up']}/{bad['n']} up"
                 + (f" ({refused} refused by the overload guard)" if refused else "")
                 + f", {bad['streams_below_keep']} below 90 %, "
                 f"{bad['lost']} connections lost, worst 5 s window {bad['worst_window_ratio']} of the rate, "
                 f"server CPU {f1(bad['cpu'].get('server_cpu_pct'))} %")
    elif s.get("first_stall") is None:
        top = max(int(x) for x in str(s.get("levels", "0")).split()) if s.get("levels") else None
        desc += (f" (levels tried up to {top}, the strict run's failing level)" if path.endswith("liberal") and top
                 else " (no level failed within the time budget)")
    guarded = guarded_levels(path)
    if guarded:
        desc += "; overload guard: " + ", ".join(
            f"N={n}: {up} served, {refused} refused, the served "
            + ("all held" if held else "did not all hold") + f" (worst window {worst})"
            for n, up, refused, held, worst in guarded)
    out(f"| concurrent 4 Mbit/s streams, {title}: {desc} | {n} | – (no beckon) | – | ≥ 1,000 | {met(n >= 1000)} |")


streams_row(sd, "direct")
streams_row(sa, "assisted")


# trigger share, direct TCP: sum over the direct throughput runs and over the stream levels
def share_tcp():
    inj = dl = 0
    for t in (t1, t8):
        for r in (t or {}).get("runs", []):
            if r["target"] == "direct":
                inj += r["counters"].get("bytes_injected_by_triggers", 0)
                dl += r["counters"].get("tcp_bytes_direct", 0)
    bulk = (inj, dl)
    inj = dl = 0
    for f in glob.glob(os.path.join(RUN, "streams-direct-*.c0.json")):
        g = f.replace(".c0.json", ".c1.json")
        try:
            a, b = json.load(open(f))["counters"], json.load(open(g))["counters"]
        except (OSError, ValueError, KeyError):
            continue
        inj += b["bytes_injected_by_triggers"] - a["bytes_injected_by_triggers"]
        dl += b["tcp_bytes_direct"] - a["tcp_bytes_direct"]
    return bulk, (inj, dl)


(bi, bd), (si, sdl) = share_tcp()
setup_c = (s20 or {}).get("counters", {})
out(f"| trigger share, direct TCP, short connections (setup runs, one `GET /` each): injected / delivered | "
    f"{pct(setup_c.get('bytes_injected_by_triggers', 0) / setup_c['tcp_bytes_direct']) if setup_c.get('tcp_bytes_direct') else '–'} "
    f"({setup_c.get('bytes_injected_by_triggers', '?')} B / {setup_c.get('tcp_bytes_direct', '?')} B) | 0 | – | – | – |")
out(f"| trigger share, direct TCP, bulk transfers | {pct(bi / bd) if bd else '–'} ({bi} B / {bd} B) | 0 | – | – | – |")
out(f"| trigger share, direct TCP, concurrent streams (all levels, ~12 s each) | {pct(si / sdl) if sdl else '–'} "
    f"({si} B / {sdl} B) | 0 | – | – | – |")
ab = 0
for t in (t1, t8):
    for r in (t or {}).get("runs", []):
        if r["target"] == "assisted":
            ab += r["counters"].get("tcp_bytes_assisted", 0)
out(f"| trigger share, assisted TCP | 100 % (the trigger relayed {ab} B in the throughput runs) | 0 | – | – | – |")

UDP_NEED = ("flows", "mapped", "answered_round2", "round1_s", "round2_s")
UDP_RSS_MAX_MIB = 1024.0  # < 1 GiB; `*_rss_mb` is VmRSS kB / 1024, i.e. MiB
UDP_KA_CPU_MAX_PCT = 10.0  # < 10 % of one core for keepalives


def udp_row(udp):
    """F flows mapped and kept alive by one server. Target: all mapped (and answered directly),
    server RSS < 1 GiB, keepalives < 10 % of a core."""
    if not udp:
        out("| UDP mappings | not measured (the client failed or ran out of time; see run/udp.json) | | | | |")
        return
    missing = [k for k in UDP_NEED if udp.get(k) is None]
    if missing:
        out(f"| UDP mappings | not measured (run/udp.json incomplete: no {', '.join(missing)}) | | | | |")
        return
    c1, c2 = udp.get("counters_round1") or {}, udp.get("counters_round2") or {}
    inj = c1.get("bytes_injected_by_triggers", 0) + c2.get("bytes_injected_by_triggers", 0)
    dl = sum(c.get("bytes_direct_to_cameras", 0) + c.get("bytes_direct_from_cameras", 0) for c in (c1, c2))
    cpu1, cpu2, idle = udp.get("cpu_round1") or {}, udp.get("cpu_round2") or {}, udp.get("cpu_idle") or {}
    flows, mapped, answered = udp["flows"], udp["mapped"], udp["answered_round2"]
    # RSS against the target: the sample after the keepalive-only period, with the mappings
    # still held. The earlier ones can include what an earlier phase (10,000s of streams) freed
    # but the allocator has not given back yet: beckon trims its heap every 30 s. Without that
    # sample, the largest one taken.
    rss = [x for x in (cpu1.get("server_rss_mb"), cpu2.get("server_rss_mb"), idle.get("server_rss_mb")) if x is not None]
    rss_checked = idle.get("server_rss_mb") if idle.get("server_rss_mb") is not None else (max(rss) if rss else None)
    # keepalives/s: the server's own count (sum of the mappings' `keepalives_sent`) between two
    # status snapshots, over the time between them; CPU: the keepalive-only window inside them
    n_ka, win = udp.get("keepalives_idle"), udp.get("keepalive_window_s")
    approx = False
    if n_ka is not None and not win and idle.get("wall_s"):
        # udp.json of an older udp_flows.py: no window of its own; the count's snapshots lay
        # just outside the CPU window, so per CPU-window second slightly overestimates
        win, approx = idle["wall_s"], True
    rate = n_ka / win if n_ka is not None and win else None
    ka_cpu = idle.get("server_cpu_pct")
    every = udp.get("keepalive_secs")
    m0, m1 = udp.get("mappings_idle_start"), udp.get("mappings_idle_end")
    ka = (f"keepalive-only period: the server sent {n_ka if n_ka is not None else '?'} keepalives"
          + (f" ({udp['keepalives_answered_idle']} answered)" if udp.get("keepalives_answered_idle") is not None else "")
          + (f" to {m0} mappings" + (f" ({m1} at the end)" if m1 is not None and m1 != m0 else "") if m0 is not None else "")
          + f" in {f1(win)} s = **{'≈ ' if approx else ''}{f1(rate)} keepalives/s** (the server's per-mapping "
          "`keepalives_sent` of `beckon status --json`, counted when it queues a keepalive for the camera's mapping"
          + ("; over the CPU window, the count's snapshots lay just outside it)" if approx
             else ", between two snapshots around the CPU window)"))
    if every and (m1 or mapped):
        ka += f"; one per mapping every keepalive_secs = {every} s would be {(m1 or mapped) / every:.0f}/s"
    tun, tun_w = (udp.get("net_idle") or {}).get("server_tun_from_beckon_packets"), udp.get("net_idle_window_s")
    if tun is not None and tun_w:
        ka += (f"; beckon wrote {tun} packets ({tun / tun_w:.0f}/s) into its TUN in the {f1(tun_w)} s CPU window "
               "(keepalives and any other traffic)")
    ka += f"; server CPU {f1(ka_cpu)} % of a core over {f1(idle.get('wall_s'))} s"
    # the targets: a failed one makes it **no**; one not recorded (and none failed) makes it –
    all_mapped = mapped == flows and answered == flows
    # kept alive: a mapping whose keepalives went unanswered twice is dropped two intervals
    # after its camera last spoke, so the keepalive-only period (60 s at keepalive_secs = 20)
    # shows it
    kept = None if m0 is None or m1 is None else m1 >= m0
    checks = (
        (all_mapped, f"{flows - mapped} of {flows} flows not mapped, {flows - answered} not answered directly",
         "mapping"),
        (kept, f"{(m0 or 0) - (m1 or 0)} of {m0} mappings dropped while only keepalives held them", "mappings kept"),
        (None if rss_checked is None else rss_checked < UDP_RSS_MAX_MIB, f"RSS {f1(rss_checked)} MiB ≥ 1 GiB", "RSS"),
        (None if ka_cpu is None else ka_cpu < UDP_KA_CPU_MAX_PCT,
         f"keepalive CPU {f1(ka_cpu)} % ≥ {UDP_KA_CPU_MAX_PCT:.0f} % of a core", "keepalive CPU"),
    )
    failed = [why for ok, why, _ in checks if ok is False]
    unknown = [name for ok, _, name in checks if ok is None]
    if failed:
        verdict = f"**no** ({'; '.join(failed)})"
    elif unknown:
        verdict = f"– ({', '.join(unknown)} not recorded)"
    else:
        verdict = "yes"
    out(f"| UDP mappings: {flows} flows (emulated cameras) to one exposure: mapped in round 1 "
        f"(p50 {f1(udp.get('round1_ms_p50'))} ms, p99 {f1(udp.get('round1_ms_p99'))} ms per flow), answered directly "
        f"in round 2 (p50 {f1(udp.get('round2_ms_p50'))} ms); server RSS (VmRSS) {f1(idle.get('server_rss_mb'))} MiB "
        f"after the keepalive-only period ({f1(cpu2.get('server_rss_mb'))} MiB at the end of round 2, "
        f"{f1(cpu1.get('server_rss_mb'))} MiB of round 1: the process's, incl. what earlier phases left allocated, "
        f"which goes back to the kernel within 30 s), CPU {f1(cpu1.get('server_cpu_s'))} s for round 1, "
        f"{f1(cpu2.get('server_cpu_s'))} s for round 2; {ka}; "
        f"{udp.get('nat_a_conntrack_entries', '?')} conntrack entries in site a's router; "
        f"trigger share {pct(inj / dl) if dl else '–'} ({inj} B / {dl} B) | "
        f"{mapped} mapped in {udp['round1_s']} s, {answered} answered in {udp['round2_s']} s; "
        f"RSS {f1(rss_checked)} MiB; keepalives {'≈ ' if approx else ''}{f1(rate)}/s at {f1(ka_cpu)} % of a core | "
        f"– | – | all {flows} mapped; RSS < 1 GiB; keepalives < {UDP_KA_CPU_MAX_PCT:.0f} % of a core | {verdict} |")


udp_row(udp)
out("")

# ------------------------------------------------------------------ diagnosis table
if tl1 or tl8 or sl:
    out("### Diagnosis: site a's router with conntrack window tracking off")
    out("")
    _nd = {}
    for _t in (t1, t8):
        for _r in (_t or {}).get("runs", []):
            if _r["target"] == "direct":
                for _k, _v in _r.get("net", {}).items():
                    _nd[_k] = _nd.get(_k, 0) + _v
    out("Not a result: the direct rows again, with `nf_conntrack_tcp_be_liberal=1` set in site a's "
        "router (`lab.sh liberal bk-bench a 1`, no TCP window tracking). The difference to the rows "
        "above is what conntrack's window tracking costs the direct path; in the direct runs above the "
        f"router dropped {_nd.get('nat_a_invalid_dropped', 0)} packets as INVALID and sent "
        f"{_nd.get('nat_a_own_rsts', 0)} RSTs of its own. The port-forward runs here are the same as above "
        "(the sysctl only relaxes checks).")
    out("")
    out("| measure | beckon | port-forward (reference) | beckon vs reference | target | met |")
    out("|---|---|---|---|---|---|")
    tput_rows(tl1, 1, only=("direct",), tag=" (be_liberal=1)", names={})
    tput_rows(tl8, 8, only=("direct",), tag=" (be_liberal=1)", names={})
    streams_row(sl, "direct-liberal", "direct (be_liberal=1)")
    out("")

# ------------------------------------------------------------------ notes (from the evidence counters)
notes = []


def net_sum(t, target):
    acc = {}
    for r in (t or {}).get("runs", []):
        if r["target"] == target:
            for k, v in r.get("net", {}).items():
                acc[k] = acc.get(k, 0) + v
    return acc


nd = {}
for t in (t1, t8):
    for k, v in net_sum(t, "direct").items():
        nd[k] = nd.get(k, 0) + v
nr = {}
for t in (t1, t8):
    for k, v in net_sum(t, "dnat-a").items():
        nr[k] = nr.get(k, 0) + v
if nd:
    notes.append(
        f"Direct-path throughput runs (strict NAT): site a's router dropped {nd.get('nat_a_invalid_dropped', 0)} "
        f"packets as conntrack INVALID, its own TCP stack sent {nd.get('nat_a_own_rsts', 0)} RSTs, the camera "
        f"retransmitted {nd.get('cam_a_retrans_segs', 0)} segments, and the server kernel dropped "
        f"{nd.get('server_tun_tx_dropped', 0)} packets on beckon's TUN (queue full); the port-forward runs "
        f"through the same router: {nr.get('nat_a_invalid_dropped', 0)} INVALID, {nr.get('nat_a_own_rsts', 0)} RSTs, "
        f"{nr.get('cam_a_retrans_segs', 0)} retransmissions.")
sdl = load(f"streams-direct-{sd['first_stall']}.json") if sd and sd.get("first_stall") else None
if sdl and sdl.get("net"):
    n = sdl["net"]
    notes.append(
        f"Concurrent direct streams, N={sdl['n']}: {sdl['lost']} connections were lost; site a's router dropped "
        f"{n.get('nat_a_invalid_dropped', 0)} packets as INVALID and its own TCP stack sent "
        f"{n.get('nat_a_own_rsts', 0)} RSTs; server TUN drops {n.get('server_tun_tx_dropped', 0)}.")
# explain only when the direct runs show the problem clearly above the port-forward's noise
if (nd.get("nat_a_own_rsts", 0) or (sdl and sdl.get("net", {}).get("nat_a_own_rsts"))
        or nd.get("nat_a_invalid_dropped", 0) > max(20, 5 * nr.get("nat_a_invalid_dropped", 0))):
    notes.append(
        "Why (as far as the lab shows): conntrack learns TCP window scaling only from the SYN and SYN-ACK it "
        "sees. In steered-resync those are trigger-injected/steered packets (in the lab's tcpdump: the "
        "injected SYNs carry only an MSS option, the steered SYN-ACKs none), while the real endpoints "
        "negotiate window scaling (the camera's SYN-ACK has `wscale`, smoltcp's receive buffer is 2 MiB or more). "
        "Conntrack then reads the advertised windows unscaled, judges in-flight data beyond them as out of "
        "window (INVALID, dropped by `ct state invalid drop`: retransmissions, lower throughput), and a server "
        "ACK it judges INVALID is not de-NATed but delivered to the router's own stack, which answers with "
        "a RST from the router's public address: the server's smoltcp socket takes it and the connection dies. "
        "With window tracking off (diagnosis table) the INVALID drops and RSTs disappear.")
prof = load("profile-direct.json")
if prof and prof.get("perf", {}).get("dso"):
    p, n = prof["perf"], prof.get("net", {})
    kern = p["dso"].get("[kernel.kallsyms]", 0)
    own = p["dso"].get("beckon", 0)
    inc = p.get("inclusive", {})
    rd, wr = n.get("server_tun_to_beckon_packets", 0), n.get("server_tun_from_beckon_packets", 0)
    mb = prof.get("bytes", 0) / 1e6
    notes.append(
        f"Where the direct path's CPU goes (`perf record -g` of the server for 4 s during a direct transfer, "
        f"{prof.get('MBps')} MB/s, window tracking off): {kern:.0f} % of its samples in the kernel, {own:.0f} % in "
        f"beckon's own code (smoltcp, rewrite, tokio); inclusive: `write`/`writev` "
        f"{inc.get('ksys_write', 0) + inc.get('do_writev', 0):.0f} % (TUN write path {inc.get('tun_get_user', 0):.0f} %), "
        f"`sendto` to the client socket {inc.get('__sys_sendto', 0):.0f} %, `read` {inc.get('ksys_read', 0):.0f} %. "
        f"During the {mb:.0f} MB transfer beckon read {rd} packets from its TUN ({(mb * 1e6 / rd if rd else 0):.0f} B "
        f"each: with TUN offload the kernel hands over TCP super-packets, up to 64 KB) and wrote {wr} into it"
        + (" (an ACK for every data packet)" if rd and wr / rd > 0.8 else
           f" (one ACK per {rd / wr:.1f} data packets)" if wr else "")
        + ". In this lab the packets written into the TUN are forwarded through "
        f"the veth, bridge, router NAT and into the camera's TCP stack inside that `write` call (softirq in "
        f"the writer's context), so part of the server's kernel time is the emulated network's.")
udp_full = udp if udp and all(udp.get(k) is not None for k in UDP_NEED) else None
if udp_full and (udp.get("perf_round2") or {}).get("top_self"):
    top = udp["perf_round2"]["top_self"][:5]
    own = udp["perf_round2"].get("dso", {}).get("beckon", 0)
    c2 = udp.get("cpu_round2") or {}
    per = (c2.get("server_cpu_s", 0) / (2 * udp["answered_round2"]) * 1e6) if udp.get("answered_round2") else None
    slower = ("round 2 (direct) took longer than round 1 (through the trigger) and "
              if udp["round2_s"] > udp["round1_s"] else "round 2 (direct) ")
    notes.append(
        f"UDP with {udp['flows']} mappings: {slower}"
        f"cost the server ≈ {f1(per)} µs CPU per datagram; {own:.0f} % of the server's samples during round 2 were "
        f"in its own code, top: " + "; ".join(f"{x[1].split('] ', 1)[-1]} {x[0]:.0f} %" for x in top)
        + ". A flow is its server port, looked up in a hash map (O(1) per datagram, whatever the number "
        f"of flows); keepalives alone (one per mapping every keepalive_secs = {udp.get('keepalive_secs') or 20} s) kept "
        f"{f1((udp.get('cpu_idle') or {}).get('server_cpu_pct'))} % of a core busy.")
if udp_full and (udp.get("counters_round1") or {}).get("indication_errors"):
    import re
    limited, rate = 0, None
    try:
        for ln in open(os.path.join(RUN, "server.log"), errors="replace"):
            if "RateLimited" in ln:
                limited += 1
                m = re.search(r"more than (\d+) indications/s", ln)
                rate = rate or (m and m.group(1))
    except OSError:
        pass
    c1 = udp["counters_round1"]
    notes.append(
        f"UDP round 1: the server sent {c1.get('indications_sent', 0)} indications for {udp['flows']} new flows; the "
        f"trigger refused {c1['indication_errors']}"
        + (f" as over its rate limit (`more than {rate} indications/s`, RateLimited; {limited} such refusals in "
           f"the whole server log); those flows were mapped when the client retried (after 2 s; the per-flow "
           f"times in the table count from the last try). New mappings are thus bounded to about {rate} per "
           f"second and trigger: {udp['flows']} flows need ≥ {int(udp['flows']) // int(rate)} s"
           if limited and rate else "")
        + ".")
if nd.get("server_tun_tx_dropped", 0):
    notes.append(
        "TUN drops: the server kernel queues packets for `public_ip` on the TUN `beckon0` (qdisc, 1000 "
        "packets; with TUN offload a TCP packet may be a super-packet of up to 64 KB); one task reads them "
        "and hands them to the shards. When it or the shards fall behind (CPU), the kernel drops and TCP "
        "retransmits.")
def work_per_gb(t, target, k):
    """Machine core-seconds per GB delivered, median over the complete runs."""
    cores = meta.get("cores") or 2
    xs = [r["cpu"]["machine_busy_pct"] / 100 * cores * r["wall_s"] / (r["bytes"] / 1e9)
          for r in (t or {}).get("runs", []) if r["target"] == target and r["streams"] == k and r["complete"]
          and r["bytes"] and r.get("cpu", {}).get("machine_busy_pct") is not None]
    return bl.median(xs)


WORK_NAMES = {"relay": "socat relay", "direct": "direct", "direct-rate": "direct (rate 10000)", "assisted": "assisted",
              "relay-pair": "relay pair", "tls-pair": "TLS relay pair"}
for t, k in ((t1, 1), (t8, 8)):
    w = {name: work_per_gb(t, name, k) for name in ("dnat-a", "dnat-b", *WORK_NAMES)}
    if w["dnat-a"]:
        parts = []
        for n, label in WORK_NAMES.items():
            ref = w[dict(TPUT_PAIRS)[n]]
            if w[n] is not None and ref:
                parts.append(f"{label} {f2(w[n])} (×{f2(w[n] / ref)})")
        notes.append(
            f"Work per GB delivered, {k} stream{'s' if k > 1 else ''} (machine core-seconds, everything on the box: "
            f"camera, router, client, beckon): port-forward {f2(w['dnat-a'])}; " + ", ".join(parts)
            + " (×: relative to the port-forward of the same site). Where the machine is saturated (8 streams), "
            "a path that does × as much work per GB gets about 1/× of the port-forward's throughput.")
# beckon against the kernel's relays of its own paths' shapes: what this machine allows a path that
# ends the camera's TCP (direct) or relays it twice (assisted), measured in the same repetitions.
SHAPE_PAIRS = (("direct", "relay", "direct / kernel relay"), ("direct-rate", "relay", "direct (rate 10000) / kernel relay"),
               ("assisted", "relay-pair", "assisted / relay pair"), ("assisted", "tls-pair", "assisted / TLS relay pair"))
for t, k in ((t1, 1), (t8, 8)):
    sm = (t or {}).get("summary", {})
    parts = []
    for path, ref, label in SHAPE_PAIRS:
        b, r = sm.get(f"{path}/{k}"), sm.get(f"{ref}/{k}")
        if b and r and b.get("MBps") and r.get("MBps") and b["complete"] and r["complete"]:
            reps = rep_ratios(t, path, ref, k)
            spread = f" ({min(reps):.2f}–{max(reps):.2f})" if len(reps) > 1 else ""
            parts.append(f"{label} {f2(b['MBps'] / r['MBps'])}{spread}")
    if parts:
        notes.append(
            f"Against the kernel's relays of the same shape, {k} stream{'s' if k > 1 else ''} (ratio of the medians; "
            "in brackets the single repetitions): " + "; ".join(parts) + ". The relays are what this machine allows "
            "a path that ends the camera's TCP on the server (and, for the pairs, again on the trigger host).")
for t, k in ((t1, 1), (t8, 8)):
    b = (t or {}).get("summary", {}).get(f"direct/{k}")
    if b:
        notes.append(
            f"CPU, direct {k} stream{'s' if k > 1 else ''}: beckon server {f1(b.get('server_cpu_pct'))} % of one core, "
            f"machine {f1(b.get('machine_busy_pct'))} % busy (2 cores: curl, cam_http.py, both kernels' TCP, beckon).")
    b = (t or {}).get("summary", {}).get(f"assisted/{k}")
    if b:
        notes.append(
            f"CPU, assisted {k} stream{'s' if k > 1 else ''}: beckon server {f1(b.get('server_cpu_pct'))} %, trigger "
            f"{f1(b.get('cpu', {}).get('trigger_b_cpu_pct'))} % of one core (TLS + yamux both ends), machine "
            f"{f1(b.get('machine_busy_pct'))} % busy.")
if notes:
    out("### Notes")
    out("")
    for n in notes:
        out(f"* {n}")
    out("")
print("\n".join(lines))
