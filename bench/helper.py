#!/usr/bin/env python3
"""Helpers for bench/run (stdlib only).

  helper.py gen-tiny DIR                       tiny "mixed" + "small" data sets for SMOKE=1
  helper.py mutate-tiny DIR/mixed ROUND        overwrite 64 KiB in the middle of the tiny big file
  helper.py wait --agent BIN --config CFG --files N --t0 EPOCH [--log LOG] [--timeout S]
        poll `coffer-agent status --json` until files.pending == 0 and files.backed_up >= N
        (and, with --log, until LOG shows the startup `scan done`); print seconds since t0
        and, with --log, the startup scan's changed= count.
  helper.py file-version --agent BIN --config CFG PATH       print the version of PATH (or 0)
  helper.py wait-version --agent BIN --config CFG PATH VERSION --t0 EPOCH
        poll `status --json PATH` until PATH is backed_up with version > VERSION and nothing
        is pending; print seconds since t0.
  helper.py latency --agent BIN --config CFG --dir DIR --size BYTES --n N
        write N new files one after another, each time polling `status --json PATH` until it
        is backed_up; prints one JSON object with the samples and the status-call overhead.
  helper.py fresh --agent BIN --config CFG --dir DIR --size BYTES --n N --t0 EPOCH --files F
                  --interval S --label L
        during an initial backup started at t0: every S seconds write a new file of BYTES in DIR
        (a watched folder), N in all, polling `status --json` of every one not yet backed up;
        then wait until the backlog is done (queue.backlog.files == 0, backed_up >= F). Prints
        one JSON object: change-to-ack samples, p50/p99, saves made while the backlog waited,
        and the backup's time from t0 (backup_s).
  helper.py gen-huge PATH BYTES                 a file of BYTES random bytes (kept if it exists)
  helper.py history-step --dir DIR --round R [--agent BIN --config CFG --t0 EPOCH]
        change 10% of DIR's files (chosen and rewritten deterministically from R: a file up to
        64 KiB is rewritten whole, a larger one gets 64 KiB overwritten at one place); with
        --agent, then poll `status --json` of the changed files until every one is backed up
        with a newer version, and print seconds since t0 and the files changed.
  helper.py gen-scale DIR FILES FOLDERS         FILES files of ~30 bytes in FOLDERS folders (the `scale`
                                               set; kept if DIR.complete says the same counts)
  helper.py scale-report --tsv TSV --files N --folders F --out MD
        the `scale` set's section of the report (rows of dataset `scale` in TSV), with its targets
  helper.py report ...                         see report() below
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLL = 0.03  # seconds between status polls (20-50 ms as asked)


def status(agent, cfg, paths=()):
    try:
        p = subprocess.run([agent, "status", "--config", cfg, "--json", *paths],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    # `status PATH...` exits 1 (pending) or 2 (unknown) with its JSON on stdout all the same
    if p.returncode != 0 and not (paths and p.returncode in (1, 2)):
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        return None


def startup_scan(log, watches=1):
    """Sum of changed= over the startup `scan done` lines in LOG once there are WATCHES of
    them (one per watch), else None."""
    seen, changed = 0, 0
    try:
        with open(log, errors="replace") as f:
            for line in f:
                if "scan done" in line and 'reason="startup"' in line:
                    seen += 1
                    for tok in line.split():
                        if tok.startswith("changed="):
                            changed += int(tok.split("=", 1)[1])
    except FileNotFoundError:
        pass
    return changed if seen >= watches else None


def cmd_wait(a):
    deadline = time.time() + a.timeout
    last = None
    while time.time() < deadline:
        scan = startup_scan(a.log, a.watches) if a.log else 0
        if scan is not None:
            st = status(a.agent, a.config)
            if st is not None:
                last = st
                f = st.get("files", {})
                if f.get("pending", 1) == 0 and f.get("backed_up", 0) >= a.files:
                    el = time.time() - a.t0
                    print(f"{el:.3f}" + (f" {scan}" if a.log else ""))
                    return 0
        time.sleep(POLL)
    print(f"timeout after {a.timeout}s; last status: {json.dumps(last)}", file=sys.stderr)
    return 1


def file_state(agent, cfg, path):
    st = status(agent, cfg, [path])
    if not st:
        return None
    e = st[0] if isinstance(st, list) else st
    return e


def cmd_file_version(a):
    e = file_state(a.agent, a.config, a.path) or {}
    print(e.get("version") or 0)
    return 0


def cmd_wait_version(a):
    deadline = time.time() + a.timeout
    e = None
    while time.time() < deadline:
        e = file_state(a.agent, a.config, a.path)
        if e and e.get("state") == "backed_up" and (e.get("version") or 0) > a.version \
                and not e.get("changed_since"):
            st = status(a.agent, a.config)
            if st and st.get("files", {}).get("pending", 1) == 0:
                print(f"{time.time() - a.t0:.3f}")
                return 0
        time.sleep(POLL)
    print(f"timeout; last: {json.dumps(e)}", file=sys.stderr)
    return 1


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cmd_latency(a):
    os.makedirs(a.dir, exist_ok=True)
    # overhead of one `coffer-agent status --json PATH` call (process spawn + journal read)
    probe = os.path.join(a.dir, "probe-missing")
    ov = []
    for _ in range(20):
        t = time.time()
        status(a.agent, a.config, [probe])
        ov.append(time.time() - t)
    samples = []
    tag = f"{a.size}-{int(time.time())}"
    for i in range(a.n):
        p = os.path.join(a.dir, f"lat-{tag}-{i:03d}.bin")
        data = os.urandom(a.size)
        t0 = time.time()
        with open(p, "wb") as f:
            f.write(data)
        # t0 = the moment the file has been written (close() done)
        t0 = time.time()
        deadline = t0 + a.timeout
        ok = False
        while time.time() < deadline:
            e = file_state(a.agent, a.config, p)
            if e and e.get("state") == "backed_up" and not e.get("changed_since"):
                samples.append(time.time() - t0)
                ok = True
                break
            time.sleep(a.poll)
        if not ok:
            print(f"latency: {p} not backed up within {a.timeout}s", file=sys.stderr)
            return 1
    print(json.dumps({"size": a.size, "n": a.n, "samples": samples,
                      "p50": pct(samples, 50), "p99": pct(samples, 99), "max": max(samples),
                      "status_call_p50": pct(ov, 50), "status_call_p99": pct(ov, 99),
                      "poll_sleep": a.poll}))
    return 0


def cmd_fresh(a):
    os.makedirs(a.dir, exist_ok=True)
    tag = f"fresh-{a.size}-{int(time.time())}"
    waiting = []  # (path, closed at)
    samples, during, saved = [], 0, 0
    next_save = a.t0 + a.start_after
    deadline = a.t0 + a.timeout
    backup_s = None
    while time.time() < deadline:
        now = time.time()
        if saved < a.n and now >= next_save:
            p = os.path.join(a.dir, f"{tag}-{saved:03d}.bin")
            with open(p, "wb") as f:
                f.write(os.urandom(a.size))
            waiting.append((p, time.time()))
            saved += 1
            next_save += a.interval
            if backup_s is None:
                during += 1
        if waiting:
            st = status(a.agent, a.config, [p for p, _ in waiting])
            if isinstance(st, list) and len(st) == len(waiting):
                t = time.time()
                left = []
                for (p, t0), e in zip(waiting, st):
                    if e.get("state") == "backed_up" and not e.get("changed_since"):
                        samples.append(t - t0)
                    else:
                        left.append((p, t0))
                waiting = left
        if backup_s is None:
            st = status(a.agent, a.config)
            # The saves acknowledged count among the files backed up: the backlog is done
            # once all of its own files are too (a 1-file backlog is not "done" when the
            # first save is acked while the big file still uploads). Saves are counted
            # after the summary was read, so a save acked meanwhile is never taken for a
            # file of the backlog.
            acked = len(samples)
            if waiting:
                later = status(a.agent, a.config, [p for p, _ in waiting])
                if isinstance(later, list):
                    acked += sum(1 for e in later if e.get("state") == "backed_up")
            if st and st.get("queue", {}).get("backlog", {}).get("files", 1) == 0 \
                    and st.get("files", {}).get("backed_up", 0) - acked >= a.files:
                backup_s = time.time() - a.t0
        if backup_s is not None and saved >= a.n and not waiting:
            break
        time.sleep(POLL)
    if backup_s is None or waiting or saved < a.n:
        print(f"fresh: not done within {a.timeout}s (backup_s={backup_s}, saved={saved}, "
              f"waiting={len(waiting)})", file=sys.stderr)
        return 1
    print(json.dumps({"label": a.label, "backlog_bytes": a.bytes, "size": a.size, "n": a.n, "during": during,
                      "interval": a.interval, "samples": samples, "p50": pct(samples, 50),
                      "p99": pct(samples, 99), "max": max(samples), "backup_s": backup_s}))
    return 0


def cmd_gen_huge(a):
    if os.path.exists(a.path) and os.path.getsize(a.path) == a.bytes:
        return 0
    os.makedirs(os.path.dirname(a.path), exist_ok=True)
    left = a.bytes
    with open(a.path + ".tmp", "wb") as f:
        while left > 0:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n
    os.rename(a.path + ".tmp", a.path)
    return 0


def cmd_gen_scale(a):
    mark = a.dir.rstrip("/") + ".complete"
    want = f"{a.files} {a.folders}\n"
    try:
        with open(mark) as f:
            if f.read() == want:
                return 0
    except FileNotFoundError:
        pass
    per = -(-a.files // a.folders)
    n = 0
    for d in range(a.folders):
        sub = os.path.join(a.dir, f"d{d:05d}")
        os.makedirs(sub, exist_ok=True)
        for i in range(min(per, a.files - n)):
            with open(os.path.join(sub, f"f{i:06d}.txt"), "wb") as f:
                f.write(b"scale file %07d of the set\n" % n)
            n += 1
    with open(mark, "w") as f:
        f.write(want)
    return 0


def cmd_gen_tiny(a):
    import hashlib
    root = a.dir
    mixed = os.path.join(root, "mixed")
    small = os.path.join(root, "small")

    def rnd(label, n):
        return hashlib.shake_256(label.encode()).digest(n)

    def w(p, d):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(d)
    w(os.path.join(mixed, "big", "random_8MiB.bin"), rnd("big", 8 << 20))
    for i in range(4):
        w(os.path.join(mixed, "medium", f"rand_{i:03d}.bin"), rnd(f"m{i}", 1 << 20))
        w(os.path.join(mixed, "medium", f"text_{i:03d}.txt"), (b"lorem ipsum dolor %d " % i) * 50000)
    for i in range(300):
        w(os.path.join(mixed, "small", f"d{i % 5}", f"f{i:04d}.bin"), rnd(f"s{i}", 1024 + (i * 37) % 8192))
    for i in range(1000):
        w(os.path.join(small, f"d{i // 100:02d}", f"f{i:05d}.txt"), (b"file %06d " % i) * 90)
    return 0


def cmd_mutate_tiny(a):
    import hashlib
    big = os.path.join(a.dir, "big", "random_8MiB.bin")
    with open(big, "r+b") as f:
        f.seek(4 << 20)
        if a.round == 0:
            f.write(hashlib.shake_256(b"big").digest(8 << 20)[4 << 20:(4 << 20) + (64 << 10)])
        else:
            f.write(hashlib.shake_256(b"mut%d" % a.round).digest(64 << 10))
    return 0


def history_changes(root, rnd):
    """The files a history round changes: 10% of them (by a hash of the round and path)."""
    import hashlib
    files = []
    for d, _, names in os.walk(root):
        for n in names:
            files.append(os.path.join(d, n))
    files.sort()
    pick = []
    for p in files:
        h = hashlib.blake2b(b"%d:" % rnd + os.path.relpath(p, root).encode(), digest_size=8).digest()
        if int.from_bytes(h, "little") % 10 == 0:
            pick.append((p, h))
    return pick


def cmd_history_step(a):
    import hashlib
    pick = history_changes(a.dir, a.round)
    paths = [p for p, _ in pick]
    before = {}
    if a.agent:
        for i in range(0, len(paths), 500):
            st = status(a.agent, a.config, paths[i:i + 500]) or []
            for e in (st if isinstance(st, list) else [st]):
                before[e.get("path")] = e.get("version") or 0
    changed = 0
    for p, h in pick:
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            if size <= 64 << 10:
                f.write(hashlib.shake_256(b"history %d " % a.round + h).digest(max(size, 1)))
            else:
                at = (int.from_bytes(h, "little") % ((size - (64 << 10)) // 4096 + 1)) * 4096
                f.seek(at)
                f.write(hashlib.shake_256(b"history %d " % a.round + h).digest(64 << 10))
        changed += 1
    if not a.agent:
        print(changed)
        return 0
    deadline = time.time() + a.timeout
    left = list(paths)
    while left and time.time() < deadline:
        time.sleep(0.2)
        still = []
        for i in range(0, len(left), 500):
            part = left[i:i + 500]
            st = status(a.agent, a.config, part)
            if st is None:
                still += part
                continue
            for e in (st if isinstance(st, list) else [st]):
                if not (e.get("state") == "backed_up" and (e.get("version") or 0) > before.get(e.get("path"), 0)
                        and not e.get("changed_since")):
                    still.append(e.get("path"))
        left = still
    if left:
        print(f"timeout: {len(left)} changed files not backed up, e.g. {left[0]}", file=sys.stderr)
        return 1
    print(f"{time.time() - a.t0:.3f} {changed}")
    return 0


# ---------------------------------------------------------------- report

def read_tsv(path):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        hdr = f.readline().rstrip("\n").split("\t")
        for line in f:
            v = line.rstrip("\n").split("\t")
            v += [""] * (len(hdr) - len(v))
            rows.append(dict(zip(hdr, v)))
    return rows


def med(rows, ds, tool, phase, col="wall_s"):
    xs = []
    for r in rows:
        if r["dataset"] == ds and r["tool"] == tool and r["phase"] == phase and r.get(col, "") != "":
            try:
                xs.append(float(r[col]))
            except ValueError:
                pass
    return (statistics.median(xs), len(xs)) if xs else (None, 0)


def fmt_s(x):
    return "—" if x is None else (f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.0f} ms")


def fmt_b(x):
    if x is None:
        return "—"
    return f"{x / 1e6:.1f} MB" if abs(x) >= 1e5 else f"{x / 1e3:.0f} kB"


def fmt_rss(kib):
    return "—" if kib is None else f"{kib / 1024:.0f} MiB"


def ratio(a, b, invert=False):
    if a is None or b is None or a == 0 or b == 0:
        return "—"
    return f"{(b / a) if invert else (a / b):.2f}x"


def cmd_report(a):
    rows = []
    for p in a.tsv:
        rows += read_tsv(p)
    meta = json.load(open(a.meta))
    lat = {}
    for p in a.latency or []:
        if os.path.exists(p):
            d = json.load(open(p))
            lat[d["size"]] = d
    sizes = meta["bytes"]
    nfiles = meta["files"]
    out = []
    P = out.append
    P("# Benchmarks: Coffer vs restic, borg and rsync\n")
    P(f"Generated by `bench/run` on {meta['date']} (commit `{meta['commit']}`{', working tree had local changes' if meta.get('dirty') else ''}).\n")
    if meta.get("smoke"):
        P("**SMOKE run: tiny data, one trial, no peers — these figures mean nothing.**\n")
    P("## Command\n")
    P("```sh\n" + meta["command"] + "\n```\n")
    P("## Machine\n")
    P("| | |\n|---|---|")
    for k in ("cpu", "nproc", "ram", "disk_free", "kernel", "load_start", "load_end", "duration"):
        P(f"| {k.replace('_', ' ')} | {meta.get(k, '?')} |")
    P("")
    P("Data sets (`../shared/bench/gen_dataset.py`, page cache warm): " + ", ".join(
        f"`{d}` {sizes[d] / 1e6:.0f} MB in {nfiles[d]} files" for d in sizes) + ".\n")
    P(f"Each figure is the median of the trials shown in brackets; trials per set: {meta['runs_desc']}. "
      "Coffer runs over loopback (agent → receiver, Noise, fsync'd packs); restic/borg write a local "
      "repository, `restic REST` goes through `rclone serve restic` on loopback, rsync copies locally "
      "(no encryption, no fsync unless stated). MB = 10^6 bytes. Before every trial, of every tool, "
      "`bench/run` syncs, empties the page cache and reads the trial's inputs back in (the data set; "
      "for a restore, the repository), so all trials start from the same memory state (why: "
      "`settle` in `bench/run`).\n")

    def cell(ds, tool, phase, kind="s", col="wall_s"):
        v, n = med(rows, ds, tool, phase, col)
        if v is None:
            return "—", None
        if kind == "s":
            return f"{fmt_s(v)} [{n}]", v
        if kind == "mbs":
            return f"{fmt_s(v)}, {sizes[ds] / 1e6 / v:.0f} MB/s [{n}]", v
        if kind == "b":
            return f"{fmt_b(v)} [{n}]", v
        if kind == "rss":
            return f"{fmt_rss(v)} [{n}]", v

    table = []

    def line(fig, ds, phase, kind, target, check, col="wall_s", coffer_phase=None, peer_phase=None,
             rsync_phase=None, peer_tool="restic-local"):
        c, cv = cell(ds, "coffer", coffer_phase or phase, kind, col)
        r, rv = cell(ds, peer_tool, peer_phase or phase, kind, col)
        b, _ = cell(ds, "borg", peer_phase or phase, kind, col)
        y, _ = cell(ds, "rsync-local", rsync_phase or peer_phase or phase, kind, col)
        if kind in ("s", "mbs"):
            rat = ratio(cv, rv, invert=False)  # coffer time / restic time
            if kind == "mbs" and cv and rv:
                rat = f"{rv / cv:.2f}x speed"
        else:
            rat = ratio(cv, rv)
        met = check(cv, rv) if (cv is not None) else None
        tgt = target + ("" if met is None else (" — **met**" if met else " — **missed**"))
        table.append((fig, c, r, b, y, rat, tgt))

    has_small = "small" in sizes
    has_mixed = "mixed" in sizes
    if has_mixed:
        line("initial backup `mixed`", "mixed", "initial", "mbs", ">= 3x restic's MB/s",
             lambda c, r: None if r is None else c * 3 <= r)
    if has_small:
        line("initial backup `small`", "small", "initial", "s", "<= 0.5x restic's time",
             lambda c, r: None if r is None else c <= 0.5 * r)
    if has_mixed:
        line("restart / no-op, nothing changed, `mixed`", "mixed", "noop", "s",
             "<= 0.25x restic's no-op", lambda c, r: None if r is None else c <= 0.25 * r)
    if has_small:
        line("restart / no-op, nothing changed, `small`", "small", "noop", "s", "(none)",
             lambda c, r: None)
    if has_mixed:
        line("1 MiB change: time to backed up (Coffer: incl. debounce)", "mixed", "mutate1MiB", "s",
             "(none)", lambda c, r: None)
        line("1 MiB change: bytes added to the store", "mixed", "mutate1MiB", "b", "<= restic's",
             lambda c, r: None if r is None else c <= r, col="bytes_added")
        line("restore `mixed`", "mixed", "restore", "mbs", ">= 2x restic restore speed",
             lambda c, r: None if r is None else c * 2 <= r)
        line("peak RSS on `mixed`: agent (Coffer) / backup client (peers)", "mixed", "initial", "rss",
             "<= 96 MiB", lambda c, r: c <= 96 * 1024, col="maxrss_kib", coffer_phase="agent-peak")
        line("peak RSS on `mixed`: receiver (Coffer) / server (restic REST: rclone)", "mixed", "x", "rss",
             "<= 64 MiB", lambda c, r: c <= 64 * 1024, col="maxrss_kib", coffer_phase="receiver-peak",
             peer_phase="peak", peer_tool="rclone-server")
    deb = meta.get("debounce_s", 2.0)
    for size, name in ((1024, "1 KiB"), (1 << 20, "1 MiB")):
        d = lat.get(size)
        if not d:
            continue
        tgt = f"p99 <= debounce + 200 ms = {deb + 0.2:.1f} s" if size == 1 << 20 else f"(debounce + 200 ms = {deb + 0.2:.1f} s)"
        ok = d["p99"] <= deb + 0.2
        if size == 1 << 20:
            tgt += " — **met**" if ok else " — **missed**"
        table.append((f"change-to-ack latency, {name} file (p50 / p99 over {d['n']})",
                      f"{fmt_s(d['p50'])} / {fmt_s(d['p99'])}", "does not watch", "does not watch",
                      "does not watch", "—", tgt))
    for p in a.fresh or []:
        if not os.path.exists(p):
            continue
        d = json.load(open(p))
        label = d["label"]
        what = f"`{label}`" if label != "huge" else f"one {d.get('backlog_bytes', 0) / (1 << 30):g} GiB file"
        ok = d["p99"] <= deb + 1.0
        table.append((f"change-to-ack of a {d['size'] // 1024} KiB file saved during the initial backup of {what} "
                      f"(p50 / p99 over {len(d['samples'])}, {d['during']} saved while the backlog waited)",
                      f"{fmt_s(d['p50'])} / {fmt_s(d['p99'])}", "does not watch", "does not watch",
                      "does not watch", "—",
                      f"p99 <= debounce + 1 s = {deb + 1:.1f} s" + (" — **met**" if ok else " — **missed**")))
        alone, _ = med(rows, label, "coffer", "initial-alone")
        withs, _ = med(rows, label, "coffer", "initial-with-saves")
        if alone and withs:
            ok = withs <= alone * 1.05
            table.append((f"initial backup of {what} with those saves / without",
                          f"{fmt_s(withs)} / {fmt_s(alone)} ({(withs / alone - 1) * 100:+.1f}%)", "—", "—", "—", "—",
                          "within 5%" + (" — **met**" if ok else " — **missed**")))
    # the REST peer RSS row: fix restic column to the rclone server RSS
    P("## Results\n")
    P("| figure | Coffer | restic | borg | rsync | ratio vs restic | target |")
    P("|---|---|---|---|---|---|---|")
    for t in table:
        P("| " + " | ".join(t) + " |")
    P("")
    P("Ratios: for times, Coffer's time / restic's time (lower is better); for speeds, Coffer's "
      "speed / restic's; for bytes and RSS, Coffer / restic. The receiver-RSS row's restic column "
      "is `rclone serve restic` (the REST server), borg and rsync have no server here.\n")
    notes = meta.get("notes", [])
    if lat:
        d = next(iter(lat.values()))
        notes.append(
            f"Latency = from the moment the new file is closed until `coffer-agent status --json PATH` "
            f"reports it `backed_up`; polled every {d['poll_sleep'] * 1000:.0f} ms, each `status` call "
            f"itself takes {d['status_call_p50'] * 1000:.1f} ms (p50, p99 {d['status_call_p99'] * 1000:.1f} ms) "
            f"— so the figures overstate the true latency by up to ~{(d['poll_sleep'] + d['status_call_p50']) * 1000:.0f} ms. "
            f"Debounce is the default {deb:g} s.")
    if notes:
        P("Notes:\n")
        for n in notes:
            P(f"- {n}")
        P("")
    out += prune_section(rows)
    # all rows
    P("## All figures (medians)\n")
    P("| data set | tool | phase | trials | wall | MB/s | peak RSS | bytes added |")
    P("|---|---|---|---|---|---|---|---|")
    seen = []
    for r in rows:
        k = (r["dataset"], r["tool"], r["phase"])
        if k not in seen:
            seen.append(k)
    for ds, tool, phase in seen:
        w, n = med(rows, ds, tool, phase)
        m, nm = med(rows, ds, tool, phase, "maxrss_kib")
        n = max(n, nm)
        b, _ = med(rows, ds, tool, phase, "bytes_added")
        mbs = f"{sizes[ds] / 1e6 / w:.0f}" if (w and phase in ("initial", "restore", "initial-fsync") and ds in sizes) else ""
        P(f"| {ds} | {tool} | {phase} | {n} | {fmt_s(w) if w is not None else ''} | {mbs} | "
          f"{fmt_rss(m) if m is not None else ''} | {fmt_b(b) if b is not None else ''} |")
    P("")
    if a.profile and os.path.exists(a.profile):
        P("## Profile\n")
        P(open(a.profile).read())
    if a.extra and os.path.exists(a.extra):
        P(open(a.extra).read())
    P(f"Raw per-trial TSV and logs: `{meta['results']}` (not committed; `/bench-results` is ignored).")
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")
    return 0


def prune_section(rows):
    """The prune row (bench/run's prune_history): Markdown lines, none without its rows."""
    def get(tool, phase):
        for r in rows:
            if r["dataset"] == "history" and r["tool"] == tool and r["phase"] == phase:
                return r
        return None

    def num(r, col):
        try:
            return float(r[col]) if r and r.get(col, "") != "" else None
        except ValueError:
            return None

    def before_after(r):
        kv = {}
        for tok in (r or {}).get("note", "").replace(";", " ").split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                if v.isdigit():
                    kv[k] = int(v)
        return kv.get("before"), kv.get("after")

    c, rs = get("coffer", "prune"), get("restic-local", "prune")
    if not c:
        return []
    out = ["## Prune and compaction\n",
           "A history of versions of a copy of `mixed` (10% of its files changed between versions, "
           "`helper.py history-step`), backed up by Coffer and by restic (one snapshot per version), "
           "then pruned to the newest version with compaction: `coffer-receiver prune` (keep_last = 1, "
           "max_unused 5%, serve stopped) and `restic forget --keep-last 1 --prune` (its default "
           "max-unused 5%). Bytes: the receiver root (index WAL checkpointed first) and the restic "
           "repository, before and after.\n",
           "| figure | Coffer | restic | ratio | target |", "|---|---|---|---|---|"]
    cw, rw = num(c, "wall_s"), num(rs, "wall_s")
    ok = cw is not None and rw is not None and cw <= rw / 2
    out.append(f"| prune + compaction, wall | {fmt_s(cw)} | {fmt_s(rw)} | {ratio(cw, rw)} | "
               f"≤ 0.5x{' — **met**' if ok else (' — **missed**' if rw else '')} |")
    cm, rm = num(c, "maxrss_kib"), num(rs, "maxrss_kib")
    okm = cm is not None and cm < 64 * 1024
    out.append(f"| peak RSS | {fmt_rss(cm)} | {fmt_rss(rm)} | {ratio(cm, rm)} | "
               f"receiver < 64 MiB{' — **met**' if okm else ' — **missed**'} |")
    cb, ca = before_after(c)
    rb, ra = before_after(rs)
    out.append(f"| bytes before → after | {fmt_b(cb)} → {fmt_b(ca)} | {fmt_b(rb)} → {fmt_b(ra)} | | |")
    out.append(f"| CPU user + sys | {fmt_s((num(c, 'user_s') or 0) + (num(c, 'sys_s') or 0))} | "
               f"{fmt_s((num(rs, 'user_s') or 0) + (num(rs, 'sys_s') or 0)) if rs else '—'} | | |")
    a, d = get("coffer", "backup-alone"), get("coffer", "backup-during-compaction")
    aw, dw = num(a, "wall_s"), num(d, "wall_s")
    if aw and dw:
        okb = dw <= aw * 1.5
        out.append(f"| backup of a fresh set alone / during a compaction | {fmt_s(aw)} / {fmt_s(dw)} "
                   f"(speed {aw / dw * 100:.0f}%) | — | — | speed ≥ 67%{' — **met**' if okb else ' — **missed**'} |")
        pk = get("coffer", "receiver-peak-serving")
        if pk:
            out.append(f"| serve's peak RSS (that backup + the compaction) | {fmt_rss(num(pk, 'maxrss_kib'))} | — | — | |")
    out.append("")
    notes = [r["note"] for r in (c, d) if r and r.get("note")]
    if notes:
        out.append("Notes: " + " | ".join(notes) + "\n")
    return out
def cmd_scale_report(a):
    rows = [r for r in read_tsv(a.tsv) if r["dataset"] == "scale"]

    def get(tool, phase, col="wall_s"):
        for r in rows:
            if r["tool"] == tool and r["phase"] == phase and r.get(col):
                try:
                    return float(r[col])
                except ValueError:
                    return None
        return None

    def mib(kib):
        return "-" if kib is None else f"{kib / 1024:.0f} MiB"

    def rate(s):
        return "-" if not s else f"{a.files / s:,.0f} files/s ({s:.1f} s)"

    def secs(s):
        return "-" if s is None else f"{s:.2f} s"

    def verdict(ok):
        return "-" if ok is None else ("met" if ok else "**missed**")

    c_init, r_init = get("coffer", "initial"), get("restic-local", "initial")
    c_noop, r_noop = get("coffer", "noop"), get("restic-local", "noop")
    a_init_rss, a_noop_rss = get("coffer", "initial", "maxrss_kib"), get("coffer", "noop", "maxrss_kib")
    rcv = [x for x in (get("coffer", "receiver-peak-initial", "maxrss_kib"),
                       get("coffer", "receiver-peak", "maxrss_kib")) if x is not None]
    rcv_peak = max(rcv) if rcv else None
    out = [f"## Scale: {a.files:,} files of ~30 bytes in {a.folders:,} folders", "",
           "One trial, page cache warm. `restic` is restic-local on the same set (`restic backup`,",
           "the same again as its no-op, `restore latest`).", "",
           "| Figure | Coffer | restic | Target | |", "|---|---|---|---|---|"]

    def line(fig, c, r, target, ok):
        out.append(f"| {fig} | {c} | {r} | {target} | {verdict(ok)} |")

    line("Initial backup", rate(c_init), rate(r_init), "faster than restic",
         None if not (c_init and r_init) else c_init < r_init)
    line("Agent peak RSS, initial backup", mib(a_init_rss), mib(get("restic-local", "initial", "maxrss_kib")),
         "bounded", None)
    line("Receiver peak RSS (backup and restore)", mib(rcv_peak), "-", "< 64 MiB",
         None if rcv_peak is None else rcv_peak < 64 * 1024)
    line("No-op restart (startup scan done, idle)", secs(c_noop), secs(r_noop), "<= 0.25x restic's",
         None if not (c_noop and r_noop) else c_noop <= 0.25 * r_noop)
    line("Agent peak RSS, restarted", mib(a_noop_rss), mib(get("restic-local", "noop", "maxrss_kib")),
         "< 128 MiB", None if a_noop_rss is None else a_noop_rss < 128 * 1024)
    line("`coffer-agent status`", secs(get("coffer", "status")), "-", "-", None)
    line("Restore", rate(get("coffer", "restore")), rate(get("restic-local", "restore")), "-", None)
    line("Restore peak RSS", mib(get("coffer", "restore", "maxrss_kib")),
         mib(get("restic-local", "restore", "maxrss_kib")), "-", None)
    out.append("")
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")
    return 0


def cmd_checkpoint(a):
    """Moves every receiver index's WAL into its database and empties the WAL (as the
    receiver's own checkpoints do), so that a size taken next counts what the store holds,
    not how much of it still sits in a WAL of varying length."""
    import glob
    import sqlite3
    for db in sorted(glob.glob(os.path.join(a.root, "repos", "*", "index.sqlite"))):
        con = sqlite3.connect(db, timeout=10)
        try:
            busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                print(f"checkpoint of {db} was busy", file=sys.stderr)
        finally:
            con.close()
    return 0


def cmd_wan_report(a):
    """The long-link row: median wall time per dataset, tool and phase (direct | delayed),
    the slowdown from the delay, and Coffer against restic over the link."""
    rows = {}
    with open(a.tsv) as f:
        next(f, None)
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 5 or not p[4]:
                continue
            rows.setdefault((p[0], p[1], p[2]), []).append(float(p[4]))
    med = lambda xs: statistics.median(xs) if xs else None
    fmt = lambda x: "-" if x is None else f"{x:.2f} s"
    ratio = lambda x, y: "-" if x is None or y is None or y == 0 else f"{x / y:.2f}x"
    sets = []
    for (ds, _, _) in rows:
        if ds not in sets:
            sets.append(ds)
    out = [f"## Long link: +{a.delay_ms:g} ms each way (delay proxy, no bandwidth limit)", "",
           "First backup direct on loopback and through `coffer-delay-proxy` (tests/src/proxy.rs), "
           "median of the trials [n]; restic backs up to `rclone serve restic` through the same proxy. "
           "Targets: Coffer's slowdown <= 1.3x; Coffer >= 1.5x restic's speed over the link.", "",
           "| data set | Coffer direct | Coffer delayed | slowdown | restic direct | restic delayed | slowdown "
           "| Coffer vs restic over the link (speed) |",
           "|---|---|---|---|---|---|---|---|"]
    for ds in sets:
        cd, cl = med(rows.get((ds, "coffer", "direct"), [])), med(rows.get((ds, "coffer", "delayed"), []))
        rd = med(rows.get((ds, "restic-rest", "direct"), []))
        rl = med(rows.get((ds, "restic-rest", "delayed"), []))
        n = len(rows.get((ds, "coffer", "delayed"), []))
        out.append(f"| {ds} | {fmt(cd)} | {fmt(cl)} [{n}] | {ratio(cl, cd)} | {fmt(rd)} | {fmt(rl)} | "
                   f"{ratio(rl, rd)} | {ratio(rl, cl)} |")
    out.append("")
    print("\n".join(out))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="cmd", required=True)
    p = sp.add_parser("wait")
    p.add_argument("--agent", required=True); p.add_argument("--config", required=True)
    p.add_argument("--files", type=int, required=True); p.add_argument("--t0", type=float, required=True)
    p.add_argument("--log"); p.add_argument("--watches", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.set_defaults(fn=cmd_wait)
    p = sp.add_parser("file-version")
    p.add_argument("--agent", required=True); p.add_argument("--config", required=True); p.add_argument("path")
    p.set_defaults(fn=cmd_file_version)
    p = sp.add_parser("wait-version")
    p.add_argument("--agent", required=True); p.add_argument("--config", required=True)
    p.add_argument("path"); p.add_argument("version", type=int)
    p.add_argument("--t0", type=float, required=True); p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(fn=cmd_wait_version)
    p = sp.add_parser("latency")
    p.add_argument("--agent", required=True); p.add_argument("--config", required=True)
    p.add_argument("--dir", required=True); p.add_argument("--size", type=int, required=True)
    p.add_argument("--n", type=int, default=50); p.add_argument("--poll", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=60)
    p.set_defaults(fn=cmd_latency)
    p = sp.add_parser("fresh")
    p.add_argument("--agent", required=True); p.add_argument("--config", required=True)
    p.add_argument("--dir", required=True); p.add_argument("--size", type=int, default=1024)
    p.add_argument("--n", type=int, default=24); p.add_argument("--t0", type=float, required=True)
    p.add_argument("--files", type=int, required=True); p.add_argument("--interval", type=float, required=True)
    p.add_argument("--start-after", type=float, default=0.5); p.add_argument("--label", required=True)
    p.add_argument("--bytes", type=int, default=0, help="bytes of the backlog (for the report)")
    p.add_argument("--timeout", type=float, default=1800)
    p.set_defaults(fn=cmd_fresh)
    p = sp.add_parser("gen-huge"); p.add_argument("path"); p.add_argument("bytes", type=int)
    p.set_defaults(fn=cmd_gen_huge)
    p = sp.add_parser("gen-tiny"); p.add_argument("dir"); p.set_defaults(fn=cmd_gen_tiny)
    p = sp.add_parser("gen-scale"); p.add_argument("dir"); p.add_argument("files", type=int)
    p.add_argument("folders", type=int); p.set_defaults(fn=cmd_gen_scale)
    p = sp.add_parser("mutate-tiny"); p.add_argument("dir"); p.add_argument("round", type=int)
    p.set_defaults(fn=cmd_mutate_tiny)
    p = sp.add_parser("checkpoint"); p.add_argument("root"); p.set_defaults(fn=cmd_checkpoint)
    p = sp.add_parser("history-step")
    p.add_argument("--dir", required=True); p.add_argument("--round", type=int, required=True)
    p.add_argument("--agent"); p.add_argument("--config"); p.add_argument("--t0", type=float, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    p.set_defaults(fn=cmd_history_step)
    p = sp.add_parser("wan-report"); p.add_argument("--tsv", required=True)
    p.add_argument("--delay-ms", type=float, required=True); p.set_defaults(fn=cmd_wan_report)
    p = sp.add_parser("scale-report"); p.add_argument("--tsv", required=True)
    p.add_argument("--files", type=int, required=True); p.add_argument("--folders", type=int, required=True)
    p.add_argument("--out", required=True); p.set_defaults(fn=cmd_scale_report)
    p = sp.add_parser("report")
    p.add_argument("--tsv", nargs="+", required=True); p.add_argument("--meta", required=True)
    p.add_argument("--latency", nargs="*"); p.add_argument("--profile"); p.add_argument("--extra")
    p.add_argument("--fresh", nargs="*"); p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_report)
    a = ap.parse_args()
    sys.exit(a.fn(a))


if __name__ == "__main__":
    main()
