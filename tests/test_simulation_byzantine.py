"""The simulator's hostile members (simulations/byzantine.py in simulations/federated.py): the defence of
protocol/allreduce/robust.py and the runner's exclusion, played over seeded swarms. Fast (a few seconds in total)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from protocol.allreduce.robust import AGGREGATORS, EXCLUDE_AFTER
from simulations.byzantine import CLEAN, judge, strike
from simulations.churn import ChurnConfig
from simulations.federated import FederatedConfig, RoundRecord
from simulations.run import main, parser
from simulations.swarm import Swarm, SwarmConfig

FED = FederatedConfig(params=20_000_000, local_steps=5)  # quick rounds, as tests/test_simulations.py's SMALL_FED


def swarm(byzantine: float, aggregator: str = "centered_clip", *, churn: float = 0.0, nodes: int = 200,
          hours: float = 0.5, seed: int = 0) -> tuple[Swarm, dict, list[RoundRecord]]:
    """Run a seeded swarm (no pipeline job); returns it, its report and every RoundRecord."""
    config = SwarmConfig(nodes=nodes, hours=hours, seed=seed, churn=ChurnConfig(churn), pipeline=None,
                         federated=replace(FED, byzantine=byzantine, aggregator=aggregator))
    s = Swarm(config)
    records: list[RoundRecord] = []
    report_round = s.fed.on_round
    s.fed.on_round = lambda r: (records.append(r), report_round(r))[-1]
    return s, s.run(), records


# ---- the pure rules ------------------------------------------------------------------------------------------


def test_a_hostile_minority_is_defended_by_every_robust_aggregator_and_not_by_mean():
    four = [False, True, False, False]
    for method in AGGREGATORS[1:]:
        v = judge(four, lost=(), aggregator=method)
        assert v.hostile == (1,) and v.defended and v.vetoed == (1,) and not v.poisoned(True)
    v = judge(four, lost=(), aggregator="mean")
    assert not v.defended and v.vetoed == () and v.poisoned(True) and not v.poisoned(False)
    assert judge([False] * 3, (), "mean") is CLEAN and not CLEAN.poisoned(True)


def test_half_or_more_hostile_is_not_defended_and_a_dead_owner_is_lost_not_vetoed():
    assert judge([True, False], (), "centered_clip").poisoned(True)  # robust.py: fewer than half, or no bound
    assert judge([True, True, False, False], (), "median").poisoned(True)
    v = judge([True, True, False, False, False], lost=(0,), aggregator="trimmed_mean")
    assert v.defended and v.vetoed == (1,)


def test_exclusion_after_the_runners_count_of_rounds():
    strikes, excluded = 0, False
    for _ in range(EXCLUDE_AFTER):
        assert not excluded
        strikes, excluded = strike(strikes)
    assert excluded and strikes == EXCLUDE_AFTER


def test_config_validates_the_fraction_and_the_aggregator():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="byzantine"):
            FederatedConfig(byzantine=bad)
    with pytest.raises(ValueError, match="aggregator must be one of"):
        FederatedConfig(aggregator="krum")
    assert FederatedConfig().aggregator == "centered_clip" and FederatedConfig().byzantine == 0.0


# ---- swarms --------------------------------------------------------------------------------------------------


def test_no_hostile_members_no_change_and_hostile_draws_leave_the_population_alone():
    plain, report, _ = swarm(0.0, churn=0.2)
    _, same, _ = swarm(0.0, "mean", churn=0.2)  # the aggregator matters only against hostile members
    for r in (report, same):
        r.pop("wall_seconds"), r.pop("config")
    assert report == same
    s = report["summary"]
    assert s["hostile_members"] == s["poisoned_rounds"] == s["hostile_excluded"] == s["dropped_parts"] == 0
    assert s["vetoed_mass"] == 0.0 and s["mean_rounds_until_exclusion"] is None
    hostile, _, _ = swarm(0.1, churn=0.2)  # the hostile draws have their own stream: same nodes, links, sessions
    assert [(m.nid, m.bw, m.depart) for _, m in plain.alive.values()] == \
        [(m.nid, m.bw, m.depart) for _, m in hostile.alive.values()]


def test_robust_aggregator_excludes_every_hostile_member_after_exclude_after_rounds_and_nothing_is_poisoned():
    s, report, records = swarm(0.1)
    summary = report["summary"]
    took_part = [m for m in s.fed.hostile if m.first_round is not None]
    assert summary["hostile_members"] == len(s.fed.hostile) > 10 and len(took_part) == summary["hostile_took_part"]
    assert len(took_part) >= len(s.fed.hostile) - 2  # (a hostile member alone with its GPU has no group to join)
    for m in took_part:
        assert m.excluded and m.group is None and m.strikes == EXCLUDE_AFTER
        assert all(m.nid not in g.members for g in s.fed.groups)
    assert summary["hostile_excluded"] == len(took_part) and summary["mean_rounds_until_exclusion"] == EXCLUDE_AFTER
    assert summary["poisoned_rounds"] == 0 and summary["groups_poisoned"] == 0
    assert summary["dropped_parts"] == EXCLUDE_AFTER * len(took_part)  # no churn: each of its rounds applied
    vetoed = [r for r in records if r.vetoed_mass > 0]
    assert vetoed and summary["vetoed_mass"] == pytest.approx(sum(r.vetoed_mass for r in vetoed))
    for r in vetoed:  # a hostile owner's span: voted missing at once (no wait), its mass back in error feedback
        assert r.outcome == "partial" and r.recovery_s == 0.0 and r.vetoed_mass <= r.mass_delayed + 1e-12
    # once its hostile members are gone, a group runs undisturbed rounds again (the steady repetition)
    assert any(r.count > 1 for r in records)
    assert all(not any(m.hostile for m in g.members.values()) for g in s.fed.groups if g.steady is not None)


def test_mean_poisons_every_round_a_hostile_member_takes_part_in_and_never_excludes():
    s, report, records = swarm(0.1, "mean")
    summary = report["summary"]
    assert summary["hostile_excluded"] == 0 and summary["dropped_parts"] == 0 and summary["vetoed_mass"] == 0.0
    hostile_groups = [g for g in s.fed.groups if any(m.hostile for m in g.members.values())]
    # no churn, no failed round: every round of a group with a hostile member (but the one in flight at the end)
    # is poisoned -- none was repeated as a clean steady round
    assert all(r.outcome == "ok" for r in records)
    in_group = sum(g.round_no - g.running for g in hostile_groups)
    assert summary["poisoned_rounds"] == in_group > 100
    assert summary["groups_poisoned"] == sum(1 for g in hostile_groups if g.round_no)
    assert all(r.count == 1 for r in records if r.poisoned)


def test_under_churn_joiners_are_drawn_hostile_too_and_excluded_the_same_way():
    s, report, _ = swarm(0.2, churn=0.5, nodes=300)
    joiners = [m for m in s.fed.hostile if int(m.nid[1:]) >= 300]
    assert joiners and report["summary"]["hostile_excluded"] > len(joiners) // 2
    for m in s.fed.hostile:
        assert m.excluded == (m.strikes >= EXCLUDE_AFTER) and m.strikes <= EXCLUDE_AFTER
        assert m.delayed == 0.0  # a hostile member holds no honest mass
        assert not m.excluded or m.group is None
    assert sum(r["hostile_excluded"] for r in report["timeline"]) == report["summary"]["hostile_excluded"]


def test_cli_flags_and_report(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["--nodes", "150", "--hours", "0.25", "--churn", "0", "--no-pipeline", "--no-plots",
                 "--params", "20000000", "--local-steps", "5", "--byzantine", "0.2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "byzantine 0.2 (centered_clip)" in printed and "hostile_excluded" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["federated"]["byzantine"] == 0.2 and report["summary"]["hostile_excluded"] > 0
    p = parser()
    assert p.parse_args(["--aggregator", "mean"]).aggregator == "mean"
    for bad in (["--byzantine", "1.5"], ["--byzantine", "x"], ["--aggregator", "krum"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2
