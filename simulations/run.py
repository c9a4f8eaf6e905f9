"""Simulate a swarm under churn and write a JSON report and PNG plots of its figures over time.

    .venv/bin/python -m simulations.run --nodes 10000 --churn 0.2 --hours 24        # the issue's run: ~30 s of one core
    .venv/bin/python -m simulations.run --nodes 200 --hours 1 --out /tmp/sim        # a quick look
    .venv/bin/python -m simulations.run --nodes 2000 --churn 0.5 --max-group 32 --result-density 0.01
    .venv/bin/python -m simulations.run --nodes 1000 --churn 0.2 --grouping random  # mixed GPUs per group
    .venv/bin/python -m simulations.run --nodes 2000 --hours 2 --byzantine 0.1      # 10% hostile (centered_clip)
    .venv/bin/python -m simulations.run --nodes 2000 --hours 2 --byzantine 0.1 --aggregator mean   # no defence
    .venv/bin/python -m simulations.run --nodes 2000 --hours 2 --natted 0.6        # 60% behind NATs, relayed

Writes into --out (default simulations/out/): report.json (configuration, summary, one row per --sample-minutes
interval, and the round-time model checked against the testbed), timeline.png (the six figures over time) and
population.png (the drawn links and GPUs). Bad flags exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import NoReturn

from protocol.allreduce.robust import AGGREGATORS
from simulations.churn import FAMILIES, ChurnConfig
from simulations.federated import GPT2_SMALL_PARAMS, GROUPINGS, FederatedConfig
from simulations.model import PopulationConfig
from simulations.pipeline import PipelineConfig
from simulations.roundtime import (
    BENCH_BURST_BYTES,
    BENCH_CPU_SHARE,
    BENCH_DENSITY,
    BENCH_PARAMS,
    BENCH_PEERS,
    NETNS_ROUND_S,
    predict_round_time,
)
from simulations.swarm import MAX_NODES, Swarm, SwarmConfig

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out"
PANELS = (  # (timeline key, title, y label)
    ("rounds_per_hour", "group rounds completed per hour", "rounds / h"),
    ("failed_fraction", "rounds that did not apply every span", "fraction"),
    ("delayed_mass", "update mass delayed in error-feedback buffers", "updates / node"),
    ("wire_mb_per_node_h", "all-reduce bytes written per node", "MB / node-hour"),
    ("recovery_fraction", "node-time lost to recovery", "fraction"),
    ("pipeline_ratio", "pipeline throughput / reference assignment", "ratio"),
)

BYZANTINE_KEYS = ("hostile_members", "hostile_took_part", "hostile_excluded", "mean_rounds_until_exclusion",
                  "mean_minutes_until_exclusion", "poisoned_rounds", "poisoned_fraction", "groups_poisoned",
                  "vetoed_fraction", "dropped_parts")  # printed with --byzantine > 0 (report.json always has them)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse's usage block is left out)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value
    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {text}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="simulations.run", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=_int_in(1, MAX_NODES), default=10_000, help="mean population")
    p.add_argument("--churn", type=_float_in(0, 1), default=0.2, help="fraction of nodes leaving per hour")
    p.add_argument("--hours", type=_float_in(0, 24 * 365, lo_open=True), default=24.0)
    p.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    p.add_argument("--sessions", choices=FAMILIES, default="lognormal", help="session length family")
    p.add_argument("--session-shape", type=_float_in(0, 100, lo_open=True), default=None,
                   help="lognormal sigma (default 1.5) or pareto alpha > 1 (default 2.0)")
    p.add_argument("--bw-mbit", type=_float_in(0.1, 1e6, lo_open=True), nargs=2, default=(10.0, 1000.0),
                   metavar=("LO", "HI"), help="log-uniform link speed range")
    p.add_argument("--params", type=_int_in(1, 2**34), default=GPT2_SMALL_PARAMS, help="federated model size")
    p.add_argument("--density", type=_float_in(0, 1, lo_open=True), default=0.01)
    p.add_argument("--result-density", type=_float_in(0, 1, lo_open=True), default=None)
    p.add_argument("--select", choices=("exact", "approx"), default="exact")
    p.add_argument("--min-group", type=_int_in(1, 256), default=2)
    p.add_argument("--max-group", type=_int_in(1, 256), default=16)
    p.add_argument("--local-steps", type=_int_in(1, 1_000_000), default=20)
    p.add_argument("--round-timeout", type=_float_in(0, 86_400, lo_open=True), default=120.0)
    p.add_argument("--grouping", choices=GROUPINGS, default="gpu")
    p.add_argument("--byzantine", type=_float_in(0, 1), default=0.0, metavar="FRACTION",
                   help="fraction of federated nodes that are hostile (simulations/byzantine.py)")
    p.add_argument("--aggregator", choices=AGGREGATORS, default="centered_clip", help="the jobs' span aggregator")
    p.add_argument("--natted", type=_float_in(0, 1), default=0.0, metavar="FRACTION",
                   help="fraction of federated nodes behind NATs, reached through relays (simulations/relays.py)")
    p.add_argument("--relayed-span-share", type=_float_in(0, 1), default=0.0, metavar="SHARE",
                   help="a NAT'd member's all-reduce span as a share of a reachable one's (0: none, the default)")
    p.add_argument("--stages", type=_int_in(1, 32), default=16, help="pipeline stages (LLaMA-2-7B shapes)")
    p.add_argument("--pipeline-nodes", type=_int_in(0, MAX_NODES), default=None)
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--sample-minutes", type=_float_in(0, 24 * 60, lo_open=True), default=10.0)
    p.add_argument("--no-plots", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> SwarmConfig:
    shape = args.session_shape if args.session_shape is not None else (1.5 if args.sessions == "lognormal" else 2.0)
    return SwarmConfig(
        nodes=args.nodes, hours=args.hours, seed=args.seed, sample_s=args.sample_minutes * 60,
        churn=ChurnConfig(args.churn, args.sessions, shape),
        population=PopulationConfig(bw_min_mbit=args.bw_mbit[0], bw_max_mbit=args.bw_mbit[1]),
        federated=FederatedConfig(params=args.params, density=args.density, result_density=args.result_density,
                                  select=args.select, min_group=args.min_group, max_group=args.max_group,
                                  local_steps=args.local_steps, round_timeout_s=args.round_timeout,
                                  grouping=args.grouping, byzantine=args.byzantine, aggregator=args.aggregator,
                                  natted=args.natted, relayed_span_share=args.relayed_span_share),
        pipeline=None if args.no_pipeline else PipelineConfig(stages=args.stages),
        pipeline_nodes=args.pipeline_nodes)


def testbed_check() -> dict:
    """predict_round_time for the netns benchmark (4 peers, 10M params, 1%, 100 Mbit/s) against its measurement."""
    out = {}
    for select, measured in NETNS_ROUND_S.items():
        predicted = predict_round_time([(100 * 1e6 / 8, 0.0)] * BENCH_PEERS, BENCH_PARAMS, BENCH_DENSITY,
                                       select=select, cpu_share=BENCH_CPU_SHARE, burst_bytes=BENCH_BURST_BYTES)
        out[select] = {"predicted_s": predicted, "measured_s": measured, "error": predicted / measured - 1}
    return out


def plot(report: dict, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["timeline"]
    t = [r["t_h"] for r in rows]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    for ax, (key, title, unit) in zip(axes.flat, PANELS):
        ys = [r.get(key) for r in rows]
        ax.plot(t, [math.nan if y is None else y for y in ys], marker=".", lw=1)
        if key == "pipeline_ratio":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("hours")
    c = report["config"]
    fig.suptitle(f"{c['nodes']} nodes, churn {c['churn']['rate_per_hour']:g}/h ({c['churn']['family']}), "
                 f"groups of <= {c['federated']['max_group']}, {c['federated']['params'] / 1e6:.0f}M params at "
                 f"{c['federated']['density']:g} density, seed {c['seed']}")
    fig.tight_layout()
    timeline = out / "timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)

    pop = report["population"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    bw = pop["bandwidth_mbit"]
    a.hist(bw, bins=np.geomspace(min(bw), max(bw), 40) if bw and min(bw) < max(bw) else 10, color="tab:blue")
    a.set_xscale("log")
    a.set_xlabel("link (Mbit/s)")
    a.set_ylabel("live nodes at the end")
    b.barh(list(pop["gpus"]), list(pop["gpus"].values()), color="tab:green")
    b.set_xlabel("live nodes at the end")
    fig.tight_layout()
    population = out / "population.png"
    fig.savefig(population, dpi=110)
    plt.close(fig)
    return [timeline, population]


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out: cannot create {args.out}: {e.strerror}")
    t0 = time.perf_counter()
    swarm = Swarm(config)
    report = swarm.run()
    report["testbed_check"] = testbed_check()
    members = [m for _, m in list(swarm.alive.values())]
    gpus = config.population.gpus
    report["population"] = {"bandwidth_mbit": [m.bw * 8 / 1e6 for m in members],
                            "gpus": {g.name: sum(1 for m in members if m.gpu == i) for i, g in enumerate(gpus)}}
    (args.out / "report.json").write_text(json.dumps(_finite(report), indent=1, allow_nan=False))
    written = [args.out / "report.json"]
    if not args.no_plots:
        written += plot(report, args.out)
    s = report["summary"]
    fed = config.federated
    hostile = f", byzantine {fed.byzantine:g} ({fed.aggregator})" if fed.byzantine > 0 else ""
    print(f"{config.nodes} nodes, churn {config.churn.rate_per_hour:g}/h{hostile}, {config.hours:g} h simulated in "
          f"{time.perf_counter() - t0:.1f} s ({report['events']} events)")
    for key in ("rounds_per_hour", "updates_applied_per_hour", "failed_fraction", "aborted_fraction",
                "delayed_mass_per_node_mean", "returned_fraction", "wire_mb_per_node_h", "sync_mb_per_node_h",
                "recovery_fraction", "idle_fraction", "churn_per_hour_measured", "pipeline_time_ratio",
                "pipeline_ratio_mean", *(BYZANTINE_KEYS if fed.byzantine > 0 else ())):
        if key in s and s[key] is not None:
            print(f"  {key:28s} {s[key]:.4g}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _finite(value):
    """The report with every inf/NaN float as null (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
