"""Measure real all-reduce rounds on the netns testbed and fit simulations/roundtime.py's CPU constants.

    sudo .venv/bin/python scripts/calibrate_roundtime.py --reps 2 --save /tmp/train.jsonl          # ~15 min
    sudo .venv/bin/python scripts/calibrate_roundtime.py --reps 2 --heldout --save /tmp/all.jsonl  # ~70 min
    .venv/bin/python scripts/calibrate_roundtime.py --load /tmp/all.jsonl    # fit and tables from saved runs

Each configuration runs real peers (node/devtools/reduce_peer.py, each with its own p2pd, in its own session) in the
network namespaces of scripts/netns_testbed.py (tc tbf egress caps; no caps for rate 0), 7 rounds of a (size,)
float32 vector at 1% density, expected group = all peers, one round every period_for() seconds. A round's time is
the slowest member's step() (selection included), as in tests/test_simulation_validation.py; round 0 (first
streams between every pair, cold caches) is left out. Before each round, with the peers idle, the script reads
/proc for the CPU every other session used in the last second (the machine is shared with other agents); the
model gets cpu_share = fair_cpu_share(cores, peers, those demands) for that round, and the link's rate and token
bucket as tc reports them.

  training set   the testbed without caps: 4, 6, 8 peers x 1M, 4M, 10M parameters and 12 peers x 1M, 4M, exact
                 top-k (fits param_s["exact"], peer_s, pair_s, round_s); 4 and 8 peers x 10M, approximate top-k
                 (fits param_s["approx"]); and one capped configuration, 8 peers x 10M x 25 Mbit/s, which checks
                 the link part (it has no fitted constant)
  held-out set   every other capped configuration of 4, 6, 8 peers x 1M, 4M, 10M x 25, 50, 100 Mbit/s (among
                 them the two of tests/test_simulation_validation.py), 12 peers x 1M, 4M x 50, 100 Mbit/s, and
                 16 peers x 1M, 4M x no cap, 50, 100 Mbit/s

The fit: per-member CPU-seconds = round time x cpu_share - codec work (CpuCosts.codec_rate, from the README) =
params * param_s + (n - 1) * peer_s + (n - 1)^2 * pair_s + round_s, by least squares on the relative error of
the configuration medians (median over all steady rounds of all repetitions, predicted per round with that
round's cpu_share). It prints the constants to paste into simulations/roundtime.py's COSTS, then one row per
configuration: measured median and the spread of the repetitions' medians, predicted (fair share) and error,
and the prediction with the plain cores / peers share for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.devtools.reduce_peer import PeerProcess  # noqa: E402
from scripts.netns_testbed import testbed  # noqa: E402
from simulations.roundtime import COSTS, CpuCosts, fair_cpu_share, predict_round_time  # noqa: E402

CORES = os.cpu_count() or 1
DENSITY = 0.01
TBF_BURST_BYTES = 256 * 1024  # scripts/netns_testbed.py: tbf ... burst 256kb; only period_for() uses it (measure()
#                               reads what tc reports: 262143 bytes)
UNCAPPED_BPS = 1.25e9  # what the model gets for an uncapped veth: 10 Gbit/s, an assumption (a round's <= 3 MB
#                        per member would take <= 3 ms at this rate; a tenth of it would still be < 10% of a round)
QUIET_CORES = 0.25  # the fit uses the rounds before which other sessions used at most this much CPU (the share is
#                     then known best); a configuration with fewer than 3 such rounds keeps all of its rounds
TRAIN = [(p, s, 0.0, "exact") for p in (4, 6, 8) for s in (1_000_000, 4_000_000, 10_000_000)] + \
        [(12, 1_000_000, 0.0, "exact"), (12, 4_000_000, 0.0, "exact")] + \
        [(4, 10_000_000, 0.0, "approx"), (8, 10_000_000, 0.0, "approx"), (8, 10_000_000, 25.0, "exact")]
HELDOUT = [(p, s, r, "exact") for p in (4, 6, 8) for s in (1_000_000, 4_000_000, 10_000_000)
           for r in (25.0, 50.0, 100.0) if (p, s, r) != (8, 10_000_000, 25.0)] + \
          [(12, s, r, "exact") for s in (1_000_000, 4_000_000) for r in (50.0, 100.0)] + \
          [(16, s, r, "exact") for s in (1_000_000, 4_000_000) for r in (0.0, 50.0, 100.0)]


# ---- measuring --------------------------------------------------------------------------------------------------


def session_cpu() -> dict[int, int]:
    """CPU ticks (utime + stime of every thread) each session's live processes used so far, from /proc/PID/stat.
    Sessions, because Linux's autogroups share the CPU between sessions."""
    out: dict[int, int] = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        sid = int(f[3])  # field 6 of proc(5): session id (0: kernel threads)
        if sid > 0:
            out[sid] = out.get(sid, 0) + int(f[11]) + int(f[12])  # fields 14, 15: utime, stime
    return out


def other_demands(before: dict[int, int], after: dict[int, int], seconds: float, ours: set[int]) -> list[float]:
    """Cores each session other than ``ours`` used between two session_cpu() readings."""
    tick = os.sysconf("SC_CLK_TCK")
    return sorted(((after[k] - before.get(k, 0)) / tick / seconds for k in after
                   if k not in ours and after[k] > before.get(k, 0)), reverse=True)


def tbf_settings(host) -> tuple[float, float]:
    """(rate bytes/s, burst bytes) of the tc tbf on a testbed host's eth0, as tc reports them."""
    out = subprocess.run([*host.prefix(), "tc", "-j", "qdisc", "show", "dev", "eth0"], check=True,
                         capture_output=True, text=True).stdout
    tbf = next(q for q in json.loads(out) if q["kind"] == "tbf")["options"]
    return float(tbf["rate"]), float(tbf["burst"])


def measure(workdir: pathlib.Path, peers: int, size: int, rate_mbit: float, rounds: int = 7, period: float = 2.5,
            mode: str = "exact") -> dict:
    """Run ``peers`` real peers for ``rounds`` rounds; per round: the slowest member's round_s, and the other
    sessions' CPU demands in the second before it. rate_mbit 0: no caps. A round that some member failed (e.g. a
    matchmaking timeout on a loaded machine: it happened once in 100 runs) is kept with ok False and left out of
    every median; a round whose members applied different averages raises."""
    go = workdir / "start_at"
    common = ["--size", str(size), "--density", str(DENSITY), "--rounds", str(rounds), "--period", str(period),
              "--start-at", f"file:{go}", "--expected-group", str(peers), "--matchmaking-time", "3",
              "--part-timeout", "20", "--result-timeout", "40", "--commit-timeout", "5", "--mode", mode,
              "--bandwidth", str((rate_mbit or 1000.0) * 1e6 / 8)]
    procs: list[PeerProcess] = []
    with testbed(peers, rate_mbit or None) as hosts:
        link = tbf_settings(hosts[0]) if rate_mbit else (UNCAPPED_BPS, 0.0)
        try:
            for i, host in enumerate(hosts):
                join = ["--join", procs[0].wait_event(60, "ready", event="ready")["addr"]] if procs else []
                procs.append(PeerProcess(workdir / f"sn{i}", [*common, "--seed", str(i), "--listen",
                                                             f"/ip4/{host.ip}/tcp/0", *join],
                                         prefix=host.prefix()).start())
            for p in procs:
                p.wait_event(120, "ready", event="ready")
            ours = {p.proc.pid for p in procs}  # each peer leads its own session (start_new_session)
            start = time.time() + 2.0
            go.write_text(str(start))
            demands = []
            for r in range(rounds):
                t0 = start + r * period
                time.sleep(max(0.0, t0 - 1.0 - time.time()))
                ta, ca = time.time(), session_cpu()
                time.sleep(max(0.0, t0 - 0.02 - time.time()))
                demands.append(other_demands(ca, session_cpu(), time.time() - ta, ours))
                # a round ends within matchmaking + part + result + commit timeouts (~70 s); a peer that exited
                # without reporting it fails the run at once, with its stderr
                deadline = time.monotonic() + period + 90
                while time.monotonic() < deadline:
                    missing = [p for p in procs if r not in p.rounds()]
                    if not missing:
                        break
                    for p in missing:
                        if p.proc is not None and p.proc.poll() is not None:
                            p.wait_event(5, f"round {r}", event="round", round=r)
                    time.sleep(0.005)
            for p in procs:
                p.wait_event(120, "done", event="done")
            per_peer = [p.rounds() for p in procs]
        finally:
            for p in procs:
                p.stop()
    out = []
    for r in range(rounds):
        events = [rs[r] for rs in per_peer]
        ok = all(e["ok"] for e in events)
        if ok and len({e["hash"] for e in events}) != 1:
            raise RuntimeError(f"round {r}: members applied different averages")
        slowest = max(events, key=lambda e: e["round_s"])
        out.append({"ok": ok, "errors": sorted({e["error"] for e in events if e["error"]}),
                    "round_s": slowest["round_s"], "select_s": max((e["select_s"] or 0.0) for e in events),
                    "phases": slowest["phases"], "sent": max(e["sent"] for e in events),
                    "others": [round(d, 3) for d in demands[r]]})
    return {"peers": peers, "size": size, "rate_mbit": rate_mbit, "mode": mode, "link_bps": link[0],
            "burst_bytes": link[1], "rounds": out}


def period_for(peers: int, size: int, rate_mbit: float = 0.0) -> float:
    """Seconds between rounds: twice the model's round time with cores / peers as the share, plus 1.5 s, so that
    the second before each round finds the peers idle for other_demands(); at least 2.5 s."""
    link = rate_mbit * 1e6 / 8 if rate_mbit else UNCAPPED_BPS
    t = predict_round_time([(link, 0.0)] * peers, size, DENSITY, cpu_share=min(1.0, CORES / peers),
                           burst_bytes=TBF_BURST_BYTES if rate_mbit else 0.0)
    return max(2.5, 1.5 + 2 * t)


# ---- predicting and fitting -------------------------------------------------------------------------------------


def steady(run: dict) -> list[dict]:
    """The rounds after the first that every member completed."""
    return [r for r in run["rounds"][1:] if r.get("ok", True)]


def predictions(run: dict, costs: CpuCosts = COSTS, fair: bool = True) -> list[float]:
    """The model's time for each steady round, with that round's cpu_share."""
    n = run["peers"]
    out = []
    for r in steady(run):
        share = fair_cpu_share(CORES, n, r["others"]) if fair else min(1.0, CORES / n)
        out.append(predict_round_time([(run["link_bps"], 0.0)] * n, run["size"], DENSITY, select=run["mode"],
                                      cpu_share=share, burst_bytes=run["burst_bytes"], costs=costs))
    return out


def key(run: dict) -> tuple:
    return run["peers"], run["size"], run["rate_mbit"], run["mode"]


def summarize(runs: list[dict], costs: CpuCosts) -> dict[tuple, dict]:
    """Per configuration: medians over the steady rounds of every repetition."""
    by: dict[tuple, list[dict]] = {}
    for run in runs:
        by.setdefault(key(run), []).append(run)
    out = {}
    for k, reps in by.items():
        measured = [r["round_s"] for run in reps for r in steady(run)]
        out[k] = {"measured": statistics.median(measured),
                  "reps": [statistics.median(r["round_s"] for r in steady(run)) for run in reps],
                  "predicted": statistics.median(p for run in reps for p in predictions(run, costs)),
                  "naive": statistics.median(p for run in reps for p in predictions(run, costs, fair=False)),
                  "others": statistics.median(sum(r["others"]) for run in reps for r in steady(run)),
                  "rounds": len(measured)}
    return out


def quiet(runs: list[dict]) -> list[dict]:
    """The runs with only their quiet rounds (see QUIET_CORES), round 0 kept in place for steady()."""
    by: dict[tuple, list[dict]] = {}
    for run in runs:
        by.setdefault(key(run), []).append(run)
    out = []
    for reps in by.values():
        calm = [dict(run, rounds=run["rounds"][:1] + [r for r in run["rounds"][1:] if sum(r["others"]) <= QUIET_CORES])
                for run in reps]
        if sum(len(steady(run)) for run in calm) >= 3:
            out.extend(run for run in calm if steady(run))
        else:
            out.extend(reps)
    return out


def residuals(runs: list[dict], make):
    """x -> the relative error of the prediction with costs ``make(x)``, one entry per configuration of ``runs``:
    what fit() and refit_machine() minimise."""
    import numpy as np

    def f(x):
        s = summarize(runs, make(x))
        return np.array([v["predicted"] / v["measured"] - 1 for v in s.values()])
    return f


def fit(runs: list[dict]) -> CpuCosts:
    """param_s["exact"], peer_s, pair_s, round_s from the uncapped exact runs; then param_s["approx"] from the
    uncapped approx runs."""
    import numpy as np
    from scipy.optimize import least_squares

    def costs_of(x, approx=0.0) -> CpuCosts:
        return dataclasses.replace(COSTS, param_s={"exact": x[0], "approx": approx}, peer_s=x[1], pair_s=x[2],
                                   round_s=x[3])

    runs = quiet(runs)
    exact = [r for r in runs if r["rate_mbit"] == 0 and r["mode"] == "exact"]
    approx = [r for r in runs if r["rate_mbit"] == 0 and r["mode"] == "approx"]
    if not exact or not approx:
        raise SystemExit("need the uncapped exact and approx training runs")
    x = least_squares(residuals(exact, costs_of), [1e-8, 5e-3, 1e-4, 5e-3], bounds=(0, np.inf),
                      x_scale=[1e-8, 1e-3, 1e-4, 1e-3]).x
    a = least_squares(residuals(approx, lambda y: costs_of(x, y[0])), [x[0]], bounds=(0, np.inf),
                      x_scale=[1e-8]).x[0]
    return costs_of(x, a)


def refit_machine(runs: list[dict], costs: CpuCosts = COSTS) -> CpuCosts:
    """``costs`` with the two constants that move with the virtual machine refitted to ``runs`` (uncapped,
    measured on the machine at hand: a small group with a large vector pins param_s, a large group with a small
    one pins pair_s): param_s (per-parameter work of processes sharing 2 cores and their caches; the approximate
    top-k's constant scaled by the same factor) and pair_s (what grows with the square of the group: DHT traffic,
    libp2p streams through every member's p2pd, context switches between 2n processes). peer_s, round_s and the
    codec rate stay the calibration's."""
    import numpy as np
    from scipy.optimize import least_squares

    def costs_of(x) -> CpuCosts:
        scale = x[0] / costs.param_s["exact"]
        return dataclasses.replace(costs, param_s={"exact": x[0], "approx": costs.param_s["approx"] * scale},
                                   pair_s=x[1])

    x0 = [costs.param_s["exact"], costs.pair_s]
    return costs_of(least_squares(residuals(runs, costs_of), x0, bounds=(0, np.inf), x_scale=[1e-8, 1e-4]).x)


def table(runs: list[dict], costs: CpuCosts, train_keys: set) -> None:
    rows = summarize(runs, costs)
    print("| set | peers | params | Mbit/s | top-k | measured: median (repetitions) | other load | predicted "
          "| error | with cores/peers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in sorted(rows, key=lambda k: (k not in train_keys, k[2] == 0, k[0], k[1], k[2])):
        v = rows[k]
        reps = ", ".join(f"{m:.3f}" for m in v["reps"])
        print(f"| {'train' if k in train_keys else 'held out'} | {k[0]} | {k[1] / 1e6:g}M | {k[2] or 'no cap'} "
              f"| {k[3]} | {v['measured']:.3f} s ({reps}) | {v['others']:.2f} | {v['predicted']:.3f} s "
              f"| {v['predicted'] / v['measured'] - 1:+.0%} | {v['naive'] / v['measured'] - 1:+.0%} |")
    held_out = [k for k in rows if k not in train_keys]
    for name, keys in (("train", [k for k in rows if k in train_keys]), ("held out", held_out)):
        if keys:
            err = [abs(rows[k]["predicted"] / rows[k]["measured"] - 1) for k in keys]
            naive = [abs(rows[k]["naive"] / rows[k]["measured"] - 1) for k in keys]
            print(f"{name}: {len(keys)} configurations, |error| median {statistics.median(err):.0%}, max "
                  f"{max(err):.0%}, within 25%: {sum(e <= 0.25 for e in err)}; with cores/peers: median "
                  f"{statistics.median(naive):.0%}, max {max(naive):.0%}, within 25%: {sum(e <= 0.25 for e in naive)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each configuration (interleaved)")
    ap.add_argument("--heldout", action="store_true", help="also measure the held-out set")
    ap.add_argument("--save", type=pathlib.Path, help="append every run to this JSON-lines file")
    ap.add_argument("--resume", action="store_true", help="skip the runs --save already holds, then fit them all")
    ap.add_argument("--load", type=pathlib.Path, action="append", default=[],
                    help="use saved runs instead of measuring (repeatable)")
    args = ap.parse_args()
    runs = [json.loads(line) for path in args.load for line in path.read_text().splitlines() if line.strip()]
    if args.resume and args.save and args.save.exists():
        runs = [json.loads(line) for line in args.save.read_text().splitlines() if line.strip()]
    if not args.load:
        if os.geteuid() != 0:
            raise SystemExit("measuring needs root (ip netns, tc); or --load saved runs")
        sets = TRAIN + (HELDOUT if args.heldout else [])
        configs = [c for rep in range(args.reps) for c in random.Random(rep).sample(sets, len(sets))]
        done = [key(r) for r in runs]
        for i, (peers, size, rate, mode) in enumerate(configs):
            if (peers, size, rate, mode) in done:
                done.remove((peers, size, rate, mode))
                continue
            with tempfile.TemporaryDirectory() as tmp:
                run = measure(pathlib.Path(tmp), peers, size, rate, period=period_for(peers, size, rate), mode=mode)
            runs.append(run)
            if args.save:
                with args.save.open("a") as f:
                    f.write(json.dumps(run) + "\n")
            med = statistics.median(r["round_s"] for r in steady(run))
            print(f"[{i + 1}/{len(configs)}] {peers} peers, {size / 1e6:g}M, {rate or 'no cap'} Mbit/s, {mode}: "
                  f"median {med:.3f} s", flush=True)
    train_keys = set(TRAIN)
    costs = fit([r for r in runs if key(r) in train_keys])
    print(f"COSTS = CpuCosts(param_s={{\"exact\": {costs.param_s['exact']:.3e}, \"approx\": "
          f"{costs.param_s['approx']:.3e}}}, peer_s={costs.peer_s:.3e}, pair_s={costs.pair_s:.3e}, "
          f"round_s={costs.round_s:.3e}, codec_rate={costs.codec_rate:.4g})")
    table(runs, costs, train_keys)


if __name__ == "__main__":
    main()
