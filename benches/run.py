#!/usr/bin/env python3
"""make bench: every figure of issue 5 as a ratio against a baseline measured
in the same run (QEMU's tools on the same image, or a bare-C physical limit).
Prints one table and writes bench-results.json.

usage: benches/run.py BUILD_DIR   (BUILD_DIR holds bench/mark, bench/lib and
the qbm binary is target/release/qbm)"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
QBM = os.path.join(ROOT, "target", "release", "qbm")
MARK = os.path.join(BUILD, "bench", "mark")
LIB = os.path.join(BUILD, "bench", "lib")
INTENT = os.path.join(BUILD, "bench", "intent")
RUNS = int(os.environ.get("QBM_BENCH_RUNS", "5"))
GIB, TIB = 1 << 30, 1 << 40

rows = []


def row(group, metric, ours, baseline, unit, target, ok, note=""):
    rows.append(dict(group=group, metric=metric, ours=ours, baseline=baseline, unit=unit,
                     ratio=(baseline / ours if ours else None) if baseline is not None else None,
                     target=target, pass_=ok, note=note))


def json_lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {d["metric"]: d.get("ns", d.get("value")) for d in map(json.loads, out.splitlines())}


def run_measured(cmd, prepare=None):
    """Wall seconds and peak RSS in KiB. The time is of the bare process; the
    peak comes from /usr/bin/time -f %M around it (ru_maxrss of a child forked
    straight from this Python process would start at Python's own size)."""
    if prepare:
        prepare()
    t0 = time.perf_counter()
    r, w = os.pipe()
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", f"/dev/fd/{w}", *cmd], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, pass_fds=(w,))
    os.close(w)
    err = p.stderr.read()
    p.wait()
    t = time.perf_counter() - t0
    rss = os.read(r, 64).decode().strip().splitlines()
    os.close(r)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {err.decode()}")
    return t, int(rss[-1])


def median_of(fn, runs=RUNS):
    ts, ms = [], []
    for _ in range(runs):
        t, m = fn()
        ts.append(t)
        ms.append(m)
    return statistics.median(ts), max(ms)


def seq(*cmds, prepare=None):
    """Several processes in a row: total time, max peak RSS."""
    def go():
        if prepare:
            prepare()
        total, peak = 0.0, 0
        for c in cmds:
            t, m = run_measured(c)
            total += t
            peak = max(peak, m)
        return total, peak
    return go


def nbd_extents(img, name):
    """qemu-nbd -B NAME + nbdinfo --map: total wall time, peak RSS of the two."""
    sock = tempfile.mktemp(prefix="qbm-bench-nbd.")
    t0 = time.perf_counter()
    r, w = os.pipe()
    srv = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", f"/dev/fd/{w}", "qemu-nbd", "-r", "-f", "qcow2",
                            "-B", name, f"--socket={sock}", img],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(w,))
    os.close(w)
    while True:
        if os.path.exists(sock):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock)
                s.close()
                break
            except OSError:
                pass
        if srv.poll() is not None:
            raise RuntimeError("qemu-nbd exited")
        time.sleep(0.002)
    t_client, m_client = run_measured(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}",
                                       f"nbd+unix:///?socket={sock}"])
    t = time.perf_counter() - t0
    # qemu-nbd exits by itself after its one client.
    try:
        srv.wait(timeout=10)
    except subprocess.TimeoutExpired:
        srv.kill()
        srv.wait()
    server_rss = int(os.read(r, 64).decode().strip().splitlines()[-1])
    os.close(r)
    if os.path.exists(sock):
        os.unlink(sock)
    return t, max(m_client, server_rss)


def fmt(v, unit):
    if v is None:
        return "-"
    if unit in ("s",):
        return f"{v:.3f} s" if v >= 0.1 else f"{v * 1e3:.1f} ms"
    if unit == "ms":
        return f"{v:.3f} ms"
    if unit == "ns":
        return f"{v:.1f} ns"
    if unit == "KiB":
        return f"{v / 1024:.1f} MiB"
    if unit == "MiB/s":
        return f"{v:.0f} MiB/s"
    if unit == "GB/s":
        return f"{v:.2f} GB/s"
    return f"{v:g} {unit}"


def item1(tmp):
    m = json_lines([MARK, tmp])
    load = os.getloadavg()[0]
    row("1 mark", "mark, 1 GiB working set, 2 bitmaps (CPU ns/call)", m["mark_1g_qbm"], m["mark_1g_bare"],
        "ns", "<= 10 ns", m["mark_1g_qbm"] <= 10, "baseline: bare C loop, two atomic ORs")
    row("1 mark", "mark, random over 16 TiB (CPU ns/call)", m["mark_16t_qbm"], m["mark_16t_bare"], "ns",
        "<= 1.5x bare", m["mark_16t_qbm"] <= 1.5 * m["mark_16t_bare"], "baseline: bare C loop on two plain arrays")
    row("1 mark", "mark, 1 GiB, same arrays behind a mutex", m["mark_1g_qbm"], m["mark_1g_mutex"], "ns",
        "info", None, "baseline: pthread mutex + the two ORs")
    row("1 mark", "mark, 16 TiB, same arrays behind a mutex", m["mark_16t_qbm"], m["mark_16t_mutex"], "ns",
        "info", None, "baseline: pthread mutex + the two ORs")
    for ws, key in (("1 GiB", "1g"), ("16 TiB", "16t")):
        one, two = m[f"mark_{key}_qbm"], m[f"mark_{key}_qbm_2t"]
        row("1 mark", f"2 threads / 1 thread aggregate rate, {ws}", one / two, None, "x",
            ">= 1.6x", one / two >= 1.6, "rate from per-thread CPU time")
    return load


def item2(tmp):
    m = json_lines([LIB, "mem", tmp])
    for key, what in (("mem_sparse_marked_kib", "10,000 scattered granules marked"),
                      ("mem_sparse_loaded_kib", "same bitmap after load"),
                      ("mem_sparse_loaded_marked_kib", "after load + 10,000 more marks (20,000)")):
        lim = 4096 if "more" not in what else None
        row("2 memory", f"16 TiB/64 KiB: {what} (RssAnon)", m[key], 32 * 1024, "KiB",
            "< 4 MiB" if lim else "info", (m[key] < lim) if lim else None, "baseline: a flat 32 MiB bitmap")
    row("2 memory", "16 TiB/64 KiB fully dirty (RssAnon)", m["mem_full_kib"], 32 * 1024, "KiB", "~32 MiB",
        m["mem_full_kib"] < 36 * 1024)


def item3(tmp):
    m = json_lines([LIB, "extents", tmp])
    row("3 extents", f"walk {int(m['extents_10k_count'])} extents of 16 TiB/64 KiB", m["extents_10k_ms"], None,
        "ms", "< 2 ms", m["extents_10k_ms"] < 2)
    row("3 extents", "walk a clean 16 TiB bitmap", m["extents_clean_ms"], None, "ms", "< 1 ms",
        m["extents_clean_ms"] < 1)
    row("3 extents", f"walk a dense bitmap ({int(m['extents_dense_count'])} extents), bitmap bytes/s",
        m["extents_dense_gbps"], m["extents_dense_scan_limit_gbps"], "GB/s", ">= 2 GB/s",
        m["extents_dense_gbps"] >= 2, "baseline: bare C scan of a 32 MiB word array")


def item4(tmp):
    m = json_lines([LIB, "io", tmp])
    inv = lambda x: 1 / x  # ratios as ours/baseline for rates
    r = m["io_store_mibps"] / m["io_seq_write_mibps"]
    rows.append(dict(group="4 store/load", metric="store dense 32 MiB bitmap (+fsync)", ours=m["io_store_mibps"],
                     baseline=m["io_seq_write_mibps"], unit="MiB/s", ratio=r, target=">= 0.7x seq write",
                     pass_=r >= 0.7, note="baseline: 1 MiB pwrites + fdatasync of 32 MiB"))
    r = m["io_load_cold_mibps"] / m["io_seq_read_cold_mibps"]
    rows.append(dict(group="4 store/load", metric="load dense 32 MiB bitmap, from the device", ours=m["io_load_cold_mibps"],
                     baseline=m["io_seq_read_cold_mibps"], unit="MiB/s", ratio=r, target=">= 0.7x seq read",
                     pass_=r >= 0.7, note="baseline: 1 MiB preads after POSIX_FADV_DONTNEED"))
    r = m["io_load_mibps"] / m["io_seq_read_mibps"]
    rows.append(dict(group="4 store/load", metric="load dense 32 MiB bitmap, page cache", ours=m["io_load_mibps"],
                     baseline=m["io_seq_read_mibps"], unit="MiB/s", ratio=r, target="info", pass_=None,
                     note="baseline: 1 MiB preads into one warm buffer"))
    row("4 store/load", "store sparse bitmap (10 dirty granules), bytes written", m["io_sparse_store_bytes"],
        32 << 20, "B", "∝ dirty clusters", m["io_sparse_store_bytes"] < 2 << 20,
        "10 data clusters of 64 KiB + table + directory + header")
    row("4 store/load", "load sparse bitmap, bytes read", m["io_sparse_load_bytes"], 32 << 20, "B",
        "∝ dirty clusters", m["io_sparse_load_bytes"] < 2 << 20)


def make_image(path, size, nb, pattern, granules=1000):
    subprocess.run([LIB, "mkimg", path, str(size), str(nb), pattern, str(granules)], check=True)


def item5(tmp):
    sizes = [("1 GiB", GIB), ("1 TiB", TIB), ("16 TiB", 16 * TIB)]
    for label, size in sizes:
        for pattern in ("sparse", "dense"):
            base = os.path.join(tmp, f"cmp-{label.replace(' ', '')}-{pattern}.qcow2")
            make_image(base, size, 2, pattern)
            img = os.path.join(tmp, "work.qcow2")
            fresh = lambda: shutil.copyfile(base, img)
            fresh()
            ops = [
                ("info", seq([QBM, "info", img]), seq(["qemu-img", "info", img])),
                ("clear", seq([QBM, "clear", img, "b0"], prepare=fresh),
                 seq(["qemu-img", "bitmap", "--clear", img, "b0"], prepare=fresh)),
                ("merge", seq([QBM, "merge", "b1", img, "b0"], prepare=fresh),
                 seq(["qemu-img", "bitmap", "--merge", "b1", img, "b0"], prepare=fresh)),
                ("add+remove", seq([QBM, "add", img, "new"], [QBM, "remove", img, "new"], prepare=fresh),
                 seq(["qemu-img", "bitmap", "--add", img, "new"], ["qemu-img", "bitmap", "--remove", img, "new"],
                     prepare=fresh)),
                ("extents", lambda: (fresh(), run_measured([QBM, "extents", img, "b0"]))[1],
                 lambda: nbd_extents(img, "b0")),
            ]
            for op, ours_fn, theirs_fn in ops:
                fresh()
                t_ours, m_ours = median_of(ours_fn)
                fresh()
                t_q, m_q = median_of(theirs_fn)
                need = 10 if pattern == "sparse" else 2
                speed = t_q / t_ours
                ok = speed >= need and m_ours * 5 <= m_q
                rows.append(dict(group="5 vs QEMU", metric=f"{op} {label} {pattern}", ours=t_ours, baseline=t_q,
                                 unit="s", ratio=speed, target=f">= {need}x, mem <= 1/5", pass_=ok,
                                 note=f"peak RSS {m_ours / 1024:.1f} / {m_q / 1024:.1f} MiB",
                                 ours_rss_kib=m_ours, baseline_rss_kib=m_q))
            os.unlink(base)
            os.unlink(img)


def item6(tmp):
    # Disk size: one bitmap with 1,000 scattered granules.
    for label, size in (("1 GiB", GIB), ("1 TiB", TIB), ("16 TiB", 16 * TIB), ("64 TiB", 64 * TIB)):
        img = os.path.join(tmp, "scale.qcow2")
        make_image(img, size, 1, "sparse")
        t, m = median_of(seq([QBM, "info", img]), runs=3)
        t2, m2 = median_of(seq(["qemu-img", "info", img]), runs=3)
        data = min(1000, size // (64 << 10) // (1 << 19) + 1)  # data clusters it must read
        rows.append(dict(group="6 scaling", metric=f"qbm info, {label}, 1 bitmap, 1,000 dirty granules", ours=t,
                         baseline=t2, unit="s", ratio=t2 / t, target="grows with data", pass_=None,
                         note=f"RSS {m / 1024:.1f} MiB (qemu-img {m2 / 1024:.1f}); "
                              f"bitmap data {os.path.getsize(img) / 2**20:.1f} MiB on disk",
                         ours_rss_kib=m, baseline_rss_kib=m2))
        os.unlink(img)
    # Number of bitmaps on a 1 GiB image.
    for nb in (1, 10, 100, 1000):
        img = os.path.join(tmp, "scale.qcow2")
        make_image(img, GIB, nb, "sparse", 100)
        t, m = median_of(seq([QBM, "info", img]), runs=3)
        t2, m2 = median_of(seq(["qemu-img", "info", img]), runs=3)
        rows.append(dict(group="6 scaling", metric=f"qbm info, 1 GiB, {nb} bitmaps", ours=t, baseline=t2,
                         unit="s", ratio=t2 / t, target="grows with data", pass_=None,
                         note=f"RSS {m / 1024:.1f} MiB (qemu-img {m2 / 1024:.1f})",
                         ours_rss_kib=m, baseline_rss_kib=m2))
        os.unlink(img)


def item7(tmp):
    """Issue 7, point 4: write-intent cost against plain marking, same run."""
    m = json_lines([INTENT, tmp])
    flush = m["pwrite+fdatasync median ns"]
    for pat in ("random 4k", "sequential 4k"):
        g = f"7 write-intent {pat}"
        warm = m[f"{pat} after first pass: share of marks waiting"]
        row(g, "share of marks waiting, after the first pass", warm * 100, None, "%", "<= 1%", warm <= 0.01,
            "100 GiB disk, 64 KiB granularity, 256 MiB working set")
        row(g, "share of marks waiting, first pass", m[f"{pat} first pass: share of marks waiting"] * 100, None,
            "%", "info", None)
        for stat in ("median", "p99"):
            wi = m[f"{pat} after first pass: write-intent {stat} ns"]
            plain = m[f"{pat} after first pass: plain {stat} ns"]
            row(g, f"mark latency after the first pass, {stat} (wall ns)", wi, plain, "ns", "info", None,
                "baseline: plain marking, same offsets, same run")
        wait = m.get(f"{pat} waiting mark: median ns")
        if wait is not None:
            row(g, "a waiting mark (median wall ns)", wait, flush, "ns", "~ one flush", wait <= 2 * flush,
                "baseline: one 512-byte pwrite + fdatasync in the same directory")


def main():
    for tool in ("qemu-img", "qemu-nbd", "nbdinfo"):
        if not shutil.which(tool):
            sys.exit(f"make bench needs {tool} (QEMU's tools are the baseline)")
    t_start = time.time()
    loads = [os.getloadavg()[0]]
    tmp = tempfile.mkdtemp(prefix="qbm-bench.", dir=os.environ.get("QBM_BENCH_DIR", ROOT + "/build"))
    try:
        for step in (item1, item2, item3, item4, item5, item6, item7):
            print(f"== {step.__name__} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            step(tmp)
            loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - t_start

    head = ("metric", "ours", "baseline", "ratio", "target", "pass")
    table = []
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        p = {True: "PASS", False: "FAIL", None: "-"}[r["pass_"]]
        table.append((f"[{r['group']}] {r['metric']}", fmt(r["ours"], r["unit"]), fmt(r["baseline"], r["unit"]),
                      ratio, r["target"], p))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        print(line(t))
    notes = [f"- {r['group']} {r['metric']}: {r['note']}" for r in rows if r.get("note")]
    print()
    print(f"load average during the run: {min(loads):.1f} .. {max(loads):.1f} (2 cores); "
          f"{elapsed:.0f} s; medians of {RUNS} runs for whole processes")
    print("\n".join(notes))
    ratio_doc = "time rows: baseline/ours (>1 = we are faster); rate rows (MiB/s, GB/s): ours/baseline"
    print(ratio_doc)
    out = {"load_average": {"min": min(loads), "max": max(loads)}, "seconds": elapsed, "runs": RUNS,
           "ratio": ratio_doc,
           "rows": [{**{k: v for k, v in r.items() if k != "pass_"}, "pass": r["pass_"]} for r in rows]}
    with open(os.path.join(ROOT, "bench-results.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("wrote bench-results.json")


if __name__ == "__main__":
    main()
