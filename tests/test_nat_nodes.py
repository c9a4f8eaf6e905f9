"""Real nodes behind real NATs (scripts/nat_testbed.py): home nodes that nobody can dial find out they are private,
keep relays, take part in a federated job that ends on one hash, show up in `doctor` as they are, and move to
another relay when theirs dies. Needs root, iproute2 and nftables; marked `netns` (make chaos)."""

from __future__ import annotations

import json
import signal

import pytest

from node.devtools.localswarm import wait_for
from node.ml.datasets import write_node_data
from scripts.nat_testbed import missing, nat_testbed
from tests.conftest import run_cli
from tests.test_jobs_integration import JOB
from tests.test_pipeline_jobs import JOB as PIPE_JOB
from tests.test_pipeline_jobs import STEPS

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(420)]
SWARM = "nat"


def doctor(node) -> dict:
    out = run_cli("doctor", "--home", str(node.home), "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def record_of(node, peer: str) -> dict | None:
    out = run_cli("peers", "--home", str(node.home), "--json", timeout=30)
    return next((p for p in json.loads(out.stdout) if p["peer_id"] == peer), None) if out.returncode == 0 else None


def test_home_nodes_behind_nat_join_train_and_fail_over_between_relays(node_factory, tmp_path):
    reason = missing()
    if reason:
        pytest.skip(reason)
    with nat_testbed(3, 2, rate_mbit=100) as (public, homes):
        for i in range(4):
            write_node_data("digits", tmp_path / f"data{i}" / "digits", n_nodes=4, node_index=i, seed=0)

        def start(name, host, data: int | None, join: str | None):
            args = ["--listen", f"/ip4/{host.ip}/tcp/0", "--swarm", SWARM]
            args += ["--data", str(tmp_path / f"data{data}")] if data is not None else []
            args += ["--join", join] if join else []
            return node_factory(name, args, prefix=host.prefix())

        a = start("a", public[0], 0, None).wait_ready(60)
        b, c = start("b", public[1], 1, a.addr), start("c", public[2], None, a.addr)  # c: a relay, no data
        h0, h1 = start("h0", homes[0], 2, a.addr), start("h1", homes[1], 3, a.addr)
        nodes = [a, b, c, h0, h1]
        for n in nodes[1:]:
            n.wait_ready(60)
        ids = {n.peer_id for n in nodes}
        wait_for(lambda: all(n.peer_ids() == ids for n in nodes), 60, "all five nodes to list each other")

        for home in (h0, h1):
            wait_for(lambda home=home: len((record_of(a, home.peer_id) or {}).get("relays", [])) == 2, 60,
                     "a home node's record to name two relays")
            report = doctor(home)
            assert (report["reachability"], report["how"]) == ("private", "checked"), report
            assert report["open_ports"] == [] and any(homes[0].public_ip in s or homes[1].public_ip in s
                                                      for s in report["seen_as"]), report
            assert any(line.startswith("you are relayed through") for line in report["advice"]), report["advice"]
            assert not [p for p in report["peers"] if p["error"]], report["peers"]  # every peer answers, even h->h
        report = doctor(a)
        assert (report["reachability"], report["how"]) == ("public", "checked") and report["open_ports"], report
        routes = {p["peer_id"]: p["route"] for p in doctor(h0)["peers"]}
        assert routes[h1.peer_id].startswith("relay "), routes  # home to home: only through a relay

        job = JOB.replace("min_participants = 2", "min_participants = 4")
        (tmp_path / "job.toml").write_text(job)
        with a.client() as client:
            job_id = client.submit(job, "job.toml").job_id

        def state():
            with a.client() as client:
                return next(client.job(job_id))

        final = wait_for(lambda: (s := state()).state in ("done", "failed") and s, 240, "the job to end", 0.5)
        assert final.state == "done" and final.round == 5, final
        assert set(final.participants) == {a.peer_id, b.peer_id, h0.peer_id, h1.peer_id}
        hashes = set()
        for n in (a, b, h0, h1):
            with n.client() as client:
                info = next(client.job(job_id))
            hashes.add(info.local_model_hash)
        assert len(hashes) == 1, hashes
        relayed = sum(doctor(n)["relay"]["bytes_relayed"] for n in (a, b, c))
        assert relayed > 0

        # h0's relays: kill one; h0 takes another reservation and h1 reaches it again
        relays = record_of(a, h0.peer_id)["relays"]
        victim = next(n for n in (b, c) if n.peer_id in relays)  # a is the bootstrap: keep it
        victim.send(signal.SIGKILL)
        victim.proc.wait(10)
        wait_for(lambda: victim.peer_id not in ((record_of(a, h0.peer_id) or {}).get("relays") or [victim.peer_id])
                 and len(record_of(a, h0.peer_id)["relays"]) == 2, 90, "h0 to replace its dead relay")
        checks = {p["peer_id"]: p for p in doctor(h1)["peers"]}
        assert checks[h0.peer_id]["error"] is None and checks[h0.peer_id]["route"].startswith("relay "), checks


def test_home_nodes_host_the_pipeline_stages_a_reachable_trainer_uses(node_factory, tmp_path):
    reason = missing()
    if reason:
        pytest.skip(reason)
    with nat_testbed(1, 2, rate_mbit=100) as (public, homes):
        data = tmp_path / "data0"
        write_node_data("pystdlib-bytes", data / "pystdlib-bytes", n_nodes=1, node_index=0, seed=0)
        trainer = node_factory("trainer", ["--listen", f"/ip4/{public[0].ip}/tcp/0", "--swarm", "pipe", "--data",
                                           str(data)], prefix=public[0].prefix()).wait_ready(60)
        hosts = [node_factory(f"h{i}", ["--listen", f"/ip4/{h.ip}/tcp/0", "--swarm", "pipe", "--join", trainer.addr],
                              prefix=h.prefix()) for i, h in enumerate(homes)]
        for h in hosts:
            h.wait_ready(60)
        ids = {n.peer_id for n in (trainer, *hosts)}
        wait_for(lambda: trainer.peer_ids() == ids, 60, "the trainer to list both home nodes")
        for h in hosts:
            wait_for(lambda h=h: (record_of(trainer, h.peer_id) or {}).get("relays"), 60, "a home node's relay")
        job_file = tmp_path / "pipe.toml"
        job_file.write_text(PIPE_JOB.replace("replicas = 2", "replicas = 1"))
        result = run_cli("submit", str(job_file), "--follow", "--json", "--home", str(trainer.home), timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert events[-1]["state"] == "done" and events[-1]["round"] == STEPS, events[-1]
        stage_hosts = {p for group in events[-1]["stage_hosts"] for p in group}
        assert stage_hosts == {h.peer_id for h in hosts}, events[-1]  # both stages on NAT'd nodes
        losses = {e["round"]: e["train_loss"] for e in events[1:] if e.get("train_loss") is not None}
        assert losses[STEPS] < losses[min(losses)], losses
