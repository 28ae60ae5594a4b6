#!/usr/bin/env python3
"""make bench: every figure of issue 5 as a ratio against a baseline measured
in the same run (QEMU's tools on the same image, or a bare-C physical limit).
Prints one table and writes bench-results.json.

usage: benches/run.py BUILD_DIR   (BUILD_DIR holds bench/mark, bench/lib,
bench/intent, bench/spawn, bench/floor, and bin/qbm, the CLI as
`make bin` links it). Whole-process rows (items 5, 6) are timed by
bench/spawn, see spawn() below."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
QBM = os.path.join(BUILD, "bin", "qbm")
MARK = os.path.join(BUILD, "bench", "mark")
LIB = os.path.join(BUILD, "bench", "lib")
INTENT = os.path.join(BUILD, "bench", "intent")
SPAWN = os.path.join(BUILD, "bench", "spawn")
FLOOR = os.path.join(BUILD, "bench", "floor")
RUNS = int(os.environ.get("QBM_BENCH_RUNS", "5"))
WARMUP = int(os.environ.get("QBM_BENCH_WARMUP", "1"))  # untimed runs before the RUNS
GIB, TIB = 1 << 30, 1 << 40

rows = []


def row(group, metric, ours, baseline, unit, target, ok, note=""):
    rows.append(dict(group=group, metric=metric, ours=ours, baseline=baseline, unit=unit,
                     ratio=(baseline / ours if ours else None) if baseline is not None else None,
                     target=target, pass_=ok, note=note))


def json_lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {d["metric"]: d.get("ns", d.get("value")) for d in map(json.loads, out.splitlines())}


def spawn(*cmds, copy=None, server=None, runs=RUNS):
    """Median wall seconds and max peak RSS (KiB) of `runs` runs, timed by
    bench/spawn (benches/spawn.c): a small static C process that fork+execs
    each command, times fork..wait4 with CLOCK_MONOTONIC and takes wait4's
    ru_maxrss, so neither Python nor /usr/bin/time is inside the figure. A
    run of several commands counts the sum of their times and the max of
    their peaks. copy=(SRC, DST): a fresh image before each run, untimed.
    server=SOCKET: the first command is a server listening there; the time
    runs from its fork until the last command exits (startup included)."""
    args = [SPAWN, "-n", str(runs), "-w", str(WARMUP)]
    if copy:
        args += ["--copy", *copy]
    if server:
        args += ["--server", server]
    for c in cmds:
        args += ["--", *c]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {p.stderr}")
    summary = json.loads(p.stdout.splitlines()[-1])
    return summary["median_s"], summary["max_maxrss_kib"]


def fmt(v, unit):
    if v is None:
        return "-"
    if unit in ("s",):
        return f"{v:.3f} s" if v >= 0.1 else f"{v * 1e3:.1f} ms" if v >= 0.01 else f"{v * 1e3:.2f} ms"
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
    row("1 mark", "mark, random over 16 TiB, vs the bare ORs in a call as long as ours", m["mark_16t_qbm"],
        m["mark_16t_bare_call"], "ns", "info", None,
        "baseline: the bare loop's two ORs in a non-inlined call padded with 100 no-ops (~120 instructions)")
    row("1 mark", "mark_many, 64 writes a call, random over 16 TiB (CPU ns/write)", m["mark_16t_qbm_many"],
        m["mark_16t_bare"], "ns", "<= 1.5x bare", m["mark_16t_qbm_many"] <= 1.5 * m["mark_16t_bare"],
        "qbm_mark_dirty_many: one bitmap at a time, every word prefetched first; same bare loop")
    row("1 mark", "mark_many, 64 writes a call, 1 GiB working set (CPU ns/write)", m["mark_1g_qbm_many"],
        m["mark_1g_bare"], "ns", "info", None, "same bare loop")
    row("1 mark", "mark, 1 GiB, same arrays behind a mutex", m["mark_1g_qbm"], m["mark_1g_mutex"], "ns",
        "info", None, "baseline: pthread mutex + the two ORs")
    row("1 mark", "mark, 16 TiB, same arrays behind a mutex", m["mark_16t_qbm"], m["mark_16t_mutex"], "ns",
        "info", None, "baseline: pthread mutex + the two ORs")
    row("1 mark", "mark, 1 GiB, 2 threads, same arrays behind a mutex (CPU ns/call, aggregate)",
        m["mark_1g_qbm_2t"], m["mark_1g_mutex_2t"], "ns", "info", None,
        "both threads mark at once: the mutex's line moves between the cores")
    for ws, key in (("1 GiB", "1g"), ("16 TiB", "16t")):
        one, two = m[f"mark_{key}_qbm"], m[f"mark_{key}_qbm_2t"]
        # The bare loop's own scaling in the same run: what the two vCPUs
        # give (they may share a physical core), shown beside ours.
        bare = m[f"mark_{key}_bare"] / m[f"mark_{key}_bare_2t"]
        row("1 mark", f"2 threads / 1 thread aggregate rate, {ws}", one / two, None, "x",
            ">= 1.6x", one / two >= 1.6,
            f"rate from per-thread CPU time; the bare C loop scales {bare:.2f}x in the same run")
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


def floor_rows():
    """What part of a whole-process row is process creation: a static C
    int main(){return 0;} and each tool's --version, measured like the rows."""
    t_floor, m_floor = spawn([FLOOR])
    t_qbm, m_qbm = spawn([QBM, "--version"])
    t_qemu, m_qemu = spawn(["qemu-img", "--version"])
    rows.append(dict(group="5 vs QEMU", metric="process floor: static C int main(){return 0;}", ours=t_floor,
                     baseline=None, unit="s", ratio=None, target="info", pass_=None,
                     note=f"peak RSS {m_floor / 1024:.1f} MiB; fork+exec+exit+wait4 from bench/spawn",
                     ours_rss_kib=m_floor))
    rows.append(dict(group="5 vs QEMU", metric="process floor: qbm --version vs qemu-img --version", ours=t_qbm,
                     baseline=t_qemu, unit="s", ratio=t_qemu / t_qbm, target="info", pass_=None,
                     note=f"peak RSS {m_qbm / 1024:.1f} / {m_qemu / 1024:.1f} MiB",
                     ours_rss_kib=m_qbm, baseline_rss_kib=m_qemu))
    return (f"process floor {t_floor * 1e3:.2f} ms (qbm --version {t_qbm * 1e3:.2f} ms, "
            f"qemu-img --version {t_qemu * 1e3:.2f} ms)")


def item5(tmp):
    floor = floor_rows()
    sizes = [("1 GiB", GIB), ("1 TiB", TIB), ("16 TiB", 16 * TIB)]
    sock = tempfile.mktemp(prefix="qbm-bench-nbd.", dir="/tmp")  # short: sun_path holds 108 bytes
    for label, size in sizes:
        for pattern in ("sparse", "dense"):
            base = os.path.join(tmp, f"cmp-{label.replace(' ', '')}-{pattern}.qcow2")
            make_image(base, size, 2, pattern)
            img = os.path.join(tmp, "work.qcow2")
            fresh = (base, img)  # copied before each run of the commands that modify the image
            ops = [
                ("info", lambda: spawn([QBM, "info", img]), lambda: spawn(["qemu-img", "info", img])),
                ("clear", lambda: spawn([QBM, "clear", img, "b0"], copy=fresh),
                 lambda: spawn(["qemu-img", "bitmap", "--clear", img, "b0"], copy=fresh)),
                ("merge", lambda: spawn([QBM, "merge", "b1", img, "b0"], copy=fresh),
                 lambda: spawn(["qemu-img", "bitmap", "--merge", "b1", img, "b0"], copy=fresh)),
                ("add+remove", lambda: spawn([QBM, "add", img, "new"], [QBM, "remove", img, "new"], copy=fresh),
                 lambda: spawn(["qemu-img", "bitmap", "--add", img, "new"],
                               ["qemu-img", "bitmap", "--remove", img, "new"], copy=fresh)),
                ("extents", lambda: spawn([QBM, "extents", img, "b0"]),
                 lambda: spawn(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", f"--socket={sock}", img],
                               ["nbdinfo", "--map=qemu:dirty-bitmap:b0", f"nbd+unix:///?socket={sock}"],
                               server=sock)),
            ]
            for op, ours_fn, theirs_fn in ops:
                shutil.copyfile(base, img)
                t_ours, m_ours = ours_fn()
                shutil.copyfile(base, img)
                t_q, m_q = theirs_fn()
                need = 10 if pattern == "sparse" else 2
                speed = t_q / t_ours
                fast, small = speed >= need, m_ours * 5 <= m_q
                ok = fast and small
                why = "+".join(w for w, good in (("time", fast), ("mem", small)) if not good)
                rows.append(dict(group="5 vs QEMU", metric=f"{op} {label} {pattern}", ours=t_ours, baseline=t_q,
                                 unit="s", ratio=speed, target=f">= {need}x, mem <= 1/5", pass_=ok, why=why,
                                 note=f"peak RSS {m_ours / 1024:.1f} / {m_q / 1024:.1f} MiB; {floor}",
                                 ours_rss_kib=m_ours, baseline_rss_kib=m_q))
            os.unlink(base)
            os.unlink(img)


def item6(tmp):
    # Disk size: one bitmap with 1,000 scattered granules.
    for label, size in (("1 GiB", GIB), ("1 TiB", TIB), ("16 TiB", 16 * TIB), ("64 TiB", 64 * TIB)):
        img = os.path.join(tmp, "scale.qcow2")
        make_image(img, size, 1, "sparse")
        t, m = spawn([QBM, "info", img], runs=3)
        t2, m2 = spawn(["qemu-img", "info", img], runs=3)
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
        t, m = spawn([QBM, "info", img], runs=3)
        t2, m2 = spawn(["qemu-img", "info", img], runs=3)
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
        # QBM_BENCH_ITEMS=5,6 runs some items only (while working on them).
        wanted = os.environ.get("QBM_BENCH_ITEMS")
        steps = (item1, item2, item3, item4, item5, item6, item7)
        for step in steps:
            if wanted and step.__name__[4:] not in wanted.split(","):
                continue
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
        if r.get("why"):
            p += f" ({r['why']})"
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
          f"{elapsed:.0f} s; whole processes: medians of {RUNS} runs (item 6: 3) after {WARMUP} warm-up, "
          f"fork+exec..wait4 timed by bench/spawn, peak RSS from wait4's ru_maxrss")
    print("\n".join(notes))
    ratio_doc = "time rows: baseline/ours (>1 = we are faster); rate rows (MiB/s, GB/s): ours/baseline"
    print(ratio_doc)
    out = {"load_average": {"min": min(loads), "max": max(loads)}, "seconds": elapsed, "runs": RUNS,
           "warmup": WARMUP, "process_timer": "bench/spawn: fork+exec..wait4, ru_maxrss",
           "ratio": ratio_doc,
           "rows": [{**{k: v for k, v in r.items() if k != "pass_"}, "pass": r["pass_"]} for r in rows]}
    with open(os.path.join(ROOT, "bench-results.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("wrote bench-results.json")


if __name__ == "__main__":
    main()
