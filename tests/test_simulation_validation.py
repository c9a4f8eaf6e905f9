"""The simulator's round-time model against real nodes (issue #6 validation).

Real all-reduce peers (node/devtools/reduce_peer.py, each with its own p2pd) run in network namespaces on one bridge,
every host's egress capped with tc tbf (scripts/netns_testbed.py); the median measured round time of small
swarms must be within 25% of simulations.roundtime.predict_round_time for the same group, vector, density, link
rate and token bucket (read back from tc). None of these configurations is in the model's calibration
(scripts/calibrate_roundtime.py fits its CPU constants to uncapped runs and checks its link part on 8 peers x 10M
x 25 Mbit/s): two group sizes at 4M parameters, a link-bound 6 x 10M at 25 Mbit/s, and a 16-peer swarm capped.

The virtual machines these tests run on differ from day to day in how fast 2n processes exchanging libp2p
streams on 2 cores go, and within a day from one minute to the next (16 x 1M x 50 Mbit/s measured 1.86-2.76 s
in four runs of one afternoon; the top-k selection alone runs at the same speed). So the test measures every
configuration 3 times, interleaved (pass 1: each configuration once, then pass 2, pass 3) and compares the median
over all their steady rounds; and each pass has two reference runs, uncapped training configurations of the
calibration (4 peers x 4M: mostly per-parameter work, run first; 12 and 16 peers x 1M uncapped: mostly the
group-squared term, run just before the capped 16-peer swarm), on which param_s and pair_s are refitted for that
pass (scripts/calibrate_roundtime.refit_machine, least squares over the three) -- the calibration's own design (CPU
constants from uncapped runs, capped runs held out) on the machine at hand, minutes apart. Why three: pinned by
12 peers alone, the model's group-squared term over-extrapolates to 16 on these machines (the capped 16 x 1M
swarm over-predicted by 44% in a CI run and 29% here with per-pass fits; 12 -> 16 peers costs ~1.8x measured,
the model says more): a known limit of the round-time model beyond the group sizes it is fitted on, so the
16-peer swarm's CPU part is fitted uncapped and its capped run checks the link part. Each run is predicted with
its own pass's constants; peer_s, round_s and the codec rate are the calibration's. The error checked is the median
over the 3 passes of each pass's paired error (its run's median prediction against its run's median round): a CI
run of 2026-12-07 measured the 16 x 1M references uncapped at 2.43, 3.12, 3.15 s and the capped swarm right after
them at 2.61, 2.45, 2.78 s, so pooling the passes' predictions and rounds separately (+29.8%) mixed one pass's
slow reference with another's fast swarm (paired, the swarm's runs were 1.07x, 0.78x and 0.88x their own pass's
16-peer reference). The printout also shows the pooled
error and each prediction with the calibration day's constants.

The machine is shared: before each round, with the peers idle, measure() reads the CPU that every other session
used (/proc), and the model gets that round's fair share of the cores (simulations.roundtime.fair_cpu_share);
the printout also shows the error with the plain cores / peers share. Round 0 (first streams between every pair,
cold caches) is left out, the model predicts steady rounds; so is a round some member failed (a matchmaking
timeout on a loaded machine, once in 100 calibration runs), which the printout names; at least 6 of the 12
steady rounds (3 runs of 5 rounds, round 0 left out) must complete -- 2 per pass measured: on a machine slow enough
that a third pass would not fit in BUDGET_S, the test compares two (and says so).

Needs root (ip netns, tc); marked `netns`, run by `make chaos` (its own CI step), not by `make test`. ~12 min here; a
peer that exits mid-run fails it at once with its stderr (scripts/calibrate_roundtime.measure).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

import pytest

# earlier in-process async tests of the chaos step (tests/test_pipeline_churn.py) can leave sockets whose
# "loop is closed" ResourceWarning is collected here; they mark the same warning as known
pytestmark = [pytest.mark.netns, pytest.mark.timeout(2100),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def netns_available() -> str:
    if os.geteuid() != 0:
        return "needs root for ip netns and tc"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    return ""


# the reference runs: two uncapped training configurations of the calibration (scripts/calibrate_roundtime.py), one
# mostly per-parameter work, one mostly the group-squared term; every validated configuration is capped
REFERENCES = [(4, 4_000_000, 0.0), (12, 1_000_000, 0.0), (16, 1_000_000, 0.0)]
CONFIGS = [(4, 4_000_000, 50.0), (8, 4_000_000, 100.0), (6, 10_000_000, 25.0), (16, 1_000_000, 50.0)]
# one pass: each reference just before the configurations nearest it in kind
PASS = [REFERENCES[0], *CONFIGS[:3], REFERENCES[1], REFERENCES[2], CONFIGS[3]]
REPS = 3  # interleaved repetitions of the reference and every configuration
# seconds the passes may take: a pass after the second starts only if one more as long as the slowest so far fits (a
# CI machine once needed > 20 min for the three passes that take ~12 min here); the module's timeout is above it
BUDGET_S = 1500.0


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{config: [run per repetition]} for REFERENCES and CONFIGS, measured in REPS interleaved passes (PASS's
    order), so that every configuration samples the machine at several moments."""
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    from scripts.calibrate_roundtime import measure, period_for

    runs: dict[tuple, list[dict]] = {}
    started, slowest = time.monotonic(), 0.0
    for rep in range(REPS):
        elapsed = time.monotonic() - started
        if rep >= 2 and elapsed + 1.1 * slowest > BUDGET_S:
            print(f"\n{rep} passes took {elapsed:.0f} s (slowest {slowest:.0f} s): pass {rep + 1} would not fit in "
                  f"{BUDGET_S:.0f} s, so the comparison uses {rep}")
            break
        t_pass = time.monotonic()
        for config in PASS:
            peers, size, rate = config
            where = tmp_path_factory.mktemp(f"{peers}x{size}x{rate:g}-rep{rep}")
            runs.setdefault(config, []).append(measure(where, peers, size, rate, rounds=5,
                                                       period=period_for(peers, size, rate)))
        slowest = max(slowest, time.monotonic() - t_pass)
    return runs


def passes_of(measured) -> int:
    return len(measured[PASS[0]])


@pytest.fixture(scope="module")
def this_machine(measured):
    """Per pass, simulations.roundtime.COSTS with param_s and pair_s refitted on that pass's reference runs."""
    from scripts.calibrate_roundtime import COSTS, refit_machine, steady

    for config in REFERENCES:
        assert sum(len(steady(run)) for run in measured[config]) >= 2 * passes_of(measured), \
            f"too few rounds of {config} completed"
    passes = []
    for rep in range(passes_of(measured)):
        refs = [measured[config][rep] for config in REFERENCES]
        # a pass whose reference lost every steady round borrows the fit over all passes
        costs = refit_machine([run for config in REFERENCES for run in measured[config]]) \
            if not all(steady(run) for run in refs) else refit_machine(refs)
        medians = ", ".join(f"{statistics.median(r['round_s'] for r in steady(run)):.3f} s" if steady(run) else "-"
                            for run in refs)
        print(f"\npass {rep + 1}: references {', '.join(f'{p} x {s}' for p, s, _ in REFERENCES)} uncapped {medians}: "
              f"param_s {costs.param_s['exact']:.3e} (x{costs.param_s['exact'] / COSTS.param_s['exact']:.2f} the "
              f"calibration's), pair_s {costs.pair_s:.3e} (x{costs.pair_s / COSTS.pair_s:.2f})")
        passes.append(costs)
    return passes


@pytest.mark.parametrize("peers, size, rate_mbit", CONFIGS,
                         ids=["4-peers-4M-50mbit", "8-peers-4M-100mbit", "6-peers-10M-25mbit", "16-peers-1M-50mbit"])
def test_predicted_round_time_is_within_25_percent_of_real_nodes(measured, this_machine, peers, size, rate_mbit):
    from scripts.calibrate_roundtime import predictions, steady

    runs = measured[(peers, size, rate_mbit)]
    rounds = [r for run in runs for r in steady(run)]
    failed = [r["errors"] for run in runs for r in run["rounds"] if not r["ok"]]
    assert len(rounds) >= 2 * passes_of(measured), f"too few rounds completed to compare: {failed}"
    median = statistics.median(r["round_s"] for r in rounds)
    predicted = statistics.median(p for run, costs in zip(runs, this_machine) for p in predictions(run, costs))
    # paired per pass: each run against the prediction from its own pass's references, minutes apart
    errors = [statistics.median(predictions(run, costs)) / statistics.median(r["round_s"] for r in steady(run)) - 1
              for run, costs in zip(runs, this_machine) if steady(run)]
    error = statistics.median(errors)
    calibrated = statistics.median(p for run in runs for p in predictions(run))
    naive = statistics.median(p for run, costs in zip(runs, this_machine) for p in predictions(run, costs, fair=False))
    others = statistics.median(sum(r["others"]) for r in rounds)
    each = ", ".join(f"{statistics.median(r['round_s'] for r in steady(run)):.3f}" for run in runs if steady(run))
    print(f"{peers} peers, {size} params, {rate_mbit} Mbit/s: measured {median:.3f} s (run medians {each}"
          f"{f'; failed: {failed}' if failed else ''}), predicted {predicted:.3f} s ({predicted / median - 1:+.1%}); "
          f"with the calibration day's constants: {calibrated:.3f} s ({calibrated / median - 1:+.1%}); other "
          f"sessions used {others:.2f} cores before the rounds; with cores / peers as the share: {naive:.3f} s "
          f"({naive / median - 1:+.1%}); per pass {', '.join(f'{e:+.1%}' for e in errors)}: median {error:+.1%}")
    assert abs(error) <= 0.25, (median, predicted, errors)
