"""A private swarm (``swarmnode swarm create | invite | join-cert``): members refuse everything of a peer without a
certificate, in the protocol (this p2pd has no pre-shared-key option).

  * The stream gate (node/runtime/p2pd.py, fed by node/runtime/admission.py) in front of every stream handler, with
    real p2pd daemons: an admitted peer gets a job's state, a shard and a stage's reply; a refused one gets each
    stream closed unread.
  * Real daemons: an owner and an invited member run a job together while an uninvited daemon of the same swarm
    name (its own p2pd and key, accepting anyone's jobs) is refused: its peer record is not listed, its job is
    neither listed nor run, and a stranger's requests to a member's job state, model files and all-reduce are
    refused.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from node.devtools.localswarm import wait_for
from node.jobs.model_files import model_file_protocol
from node.ml.datasets import write_node_data
from node.runtime.errors import NodeError
from protocol.pipeline.control import stage_protocol
from protocol.streams import STREAM_ENDINGS, open_stream, request, serve_on
from protocol.transfer.job_state import JobState, fetch_job_state, job_state_protocol, serve_job_state
from protocol.transfer.shard_transfer import ShardServer, ShardTransferError, fetch_shard, shard_protocol
from tests.conftest import cli_in_process
from tests.test_jobs_integration import JOB
from tests.test_shard_transfer import daemons, make_shard

# streams a refusal cuts leave hivemind client transports that only the garbage collector closes (conftest.py)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SWARM = "lab"
JOB_ID = "0123456789abcdef"
logger = logging.getLogger(__name__)


def test_a_refused_peers_streams_are_closed_unread_on_every_service(tmp_path):
    async def echo(stream) -> None:
        await stream.send(await stream.receive(64, 5))

    async def scenario():
        async with daemons(3) as (server, member, stranger):
            server_id, admitted = server.peer_id.to_base58(), member.peer_id.to_base58()
            asked: list[str] = []

            async def admit(peer: str) -> bool:
                asked.append(peer)
                return peer == admitted

            server.admit = admit  # what OwnedP2PDaemon.set_admission sets
            path, info = make_shard(tmp_path, "stage-000.safetensors", 100_000, seed=1)
            shards = ShardServer(server, shard_protocol(SWARM), {info.sha256: path}.get)
            await shards.start()
            state = JobState(1, 1, np.arange(10, dtype=np.float32), None, b"")

            async def state_of(job_id: str) -> JobState:
                return state

            stage = stage_protocol(SWARM, "p", 0, "forward")
            await serve_on(server, {job_state_protocol(SWARM): lambda s: serve_job_state(s, state_of), stage: echo},
                           logger)
            header, got = await fetch_job_state(member, server_id, SWARM, JOB_ID, 10, 5.0)
            assert header.completed == 1 and np.array_equal(got.params, state.params)
            await fetch_shard(member, [server_id], info, tmp_path / "m" / info.file,
                              protocol_name=shard_protocol(SWARM), timeout=5.0)
            assert await asyncio.wait_for(request(member, server_id, stage, b"ping", 64), 5) == b"ping"

            with pytest.raises(STREAM_ENDINGS):
                await fetch_job_state(stranger, server_id, SWARM, JOB_ID, 10, 5.0)
            with pytest.raises(ShardTransferError):
                await fetch_shard(stranger, [server_id], info, tmp_path / "s" / info.file,
                                  protocol_name=shard_protocol(SWARM), timeout=5.0)
            with pytest.raises(STREAM_ENDINGS):
                await asyncio.wait_for(request(stranger, server_id, stage, b"ping", 64), 5)
            assert not (tmp_path / "s" / info.file).exists()
            assert set(asked) == {admitted, stranger.peer_id.to_base58()}
            await shards.stop()

    asyncio.run(scenario())


def cli(*args: str) -> str:
    done = cli_in_process(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def jobs_of(node) -> set[str]:
    with node.client() as client:
        return {j.job_id for j in client.jobs().jobs}


def job_state(node, job_id: str) -> str:
    with node.client() as client:
        return next(client.job(job_id)).state


async def stranger_requests(bootstrap: str, member: str, job_id: str) -> list[str]:
    """What a peer without a certificate gets from a member's services: one line per refused request."""
    from node.runtime.p2pd import OwnedP2PDaemon

    daemon = OwnedP2PDaemon()
    p2p = await daemon.start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[bootstrap])
    refused = []
    try:
        try:
            await fetch_job_state(p2p, member, SWARM, job_id, 10, 5.0)
        except STREAM_ENDINGS as e:
            refused.append(f"job state: {type(e).__name__}")
        for name in (model_file_protocol(SWARM), f"swarmnode/{SWARM}/allreduce/job-{job_id}/invite"):
            try:
                async with open_stream(p2p, member, name, dial_timeout=5.0) as stream:
                    try:  # the member may hang up before this first frame is even written
                        await stream.send(b"\x80")  # any first frame: it is never read
                        await stream.receive(1 << 20, 5.0)
                    except STREAM_ENDINGS as e:
                        refused.append(f"{name.rsplit('/', 1)[-1]}: {type(e).__name__}")
            except Exception as e:  # p2pd's ControlFailure: the job's all-reduce handler left with its runner (done)
                if "protocols not supported" not in str(e):
                    raise
                refused.append(f"{name.rsplit('/', 1)[-1]}: not served")
        return refused
    finally:
        await daemon.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_uninvited_node_is_refused_by_every_service_and_an_invited_one_works(node_factory, tmp_path):
    owner, member, outsider = (tmp_path / name for name in ("owner", "member", "outsider"))
    cli("swarm", "create", SWARM, "--home", str(owner))
    member_id = cli("swarm", "id", "--home", str(member)).strip()
    cert = tmp_path / "member.cert"
    cli("swarm", "invite", member_id, "--home", str(owner), "--out", str(cert))
    cli("swarm", "join-cert", str(cert), "--home", str(member))
    for i in range(3):
        write_node_data("digits", tmp_path / f"data{i}" / "digits", n_nodes=3, node_index=i, seed=0)
    base = ["--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", SWARM]
    a = node_factory("owner", [*base, "--data", str(tmp_path / "data0")]).wait_ready()
    b = node_factory("member", [*base, "--data", str(tmp_path / "data1"), "--join", a.addr])
    c = node_factory("outsider", [*base, "--data", str(tmp_path / "data2"), "--join", a.addr,
                                  "--accept-jobs-from", "anyone"])
    b.wait_ready(), c.wait_ready()
    assert outsider.name in str(c.home) and not (c.home / "swarm.cert").exists()
    wait_for(lambda: a.peer_ids() == b.peer_ids() == {a.peer_id, b.peer_id}, 30, "the members to list each other")

    (tmp_path / "outsider.toml").write_text(JOB.replace("digits-test", "outsiders"))
    with c.client() as client:  # stored nowhere but at the outsider itself, if at all
        try:
            outsiders_job = client.submit((tmp_path / "outsider.toml").read_text(), "outsider.toml").job_id
        except NodeError as e:
            assert "could not be stored in the DHT" in str(e)
            outsiders_job = None
    (tmp_path / "member.toml").write_text(JOB.replace("rounds = 5", "rounds = 3"))
    with b.client() as client:
        members_job = client.submit((tmp_path / "member.toml").read_text(), "member.toml").job_id
    wait_for(lambda: job_state(a, members_job) == "done", 90, "the members' job to finish", interval=0.3)
    with a.client() as client:
        final = next(client.job(members_job))
    assert set(final.participants) == {a.peer_id, b.peer_id} and final.round == 3

    for node in (a, b):
        assert node.peer_ids() == {a.peer_id, b.peer_id}  # the outsider's record is refused everywhere
        assert jobs_of(node) == {members_job}  # its job is not listed (nor run, nor declined)
    assert outsiders_job is None or jobs_of(c) == {outsiders_job}  # and it cannot read the members' job
    assert "rejected a record in private swarm 'lab'" in a.log_path.read_text()
    refused = asyncio.run(stranger_requests(a.addr, a.peer_id, members_job))
    # the invite handler lives while the job's runner does: refused by the gate, or already gone with the job
    # a hang-up reads as an incomplete frame, or as a reset when it beats our first frame out
    hung_up = ("IncompleteReadError", "ConnectionResetError")
    assert [line.split(": ")[0] for line in refused] == ["job state", "model-file", "invite"], refused
    assert all(line.split(": ")[1] in hung_up for line in refused[:2]), refused
    assert refused[2].split(": ")[1] in (*hung_up, "not served"), refused
    assert "refused a stream from" in a.log_path.read_text()


def test_who_counts_as_a_member_in_an_open_and_a_private_swarm():
    from node.runtime.admission import REFRESH_S, Admission
    from node.runtime.membership import PeerView
    from tests.test_validation import peer_record
    from tests.test_wire_bytes import ID_A, ID_B, ID_C

    class Peers:  # the part of Membership that Admission reads
        def __init__(self) -> None:
            self.live: list[str] = []
            self.reads = 0

        async def peers(self) -> list[PeerView]:
            self.reads += 1
            return [PeerView(peer_record(p), 0.0) for p in self.live]

    async def scenario():
        now = [0.0]
        peers, certified = Peers(), {ID_B}
        public = Admission(ID_A, peers, clock=lambda: now[0])  # type: ignore[arg-type]
        assert await public.is_member(ID_A) and not await public.is_member(ID_B) and peers.reads == 1
        peers.live = [ID_B]
        assert not await public.is_member(ID_B) and peers.reads == 1  # read again at most once per REFRESH_S
        now[0] += REFRESH_S
        assert await public.is_member(ID_B) and peers.reads == 2
        peers.live = []
        assert await public.is_member(ID_B)  # seen once: a job outlives its submitter's record
        assert public.admit(ID_C) and await public.admit_stream(ID_C)  # an open swarm serves everyone

        private = Admission(ID_A, peers, certified.__contains__, clock=lambda: now[0])  # type: ignore[arg-type]
        assert private.admit(ID_A) and private.admit(ID_B) and not private.admit(ID_C)
        assert await private.is_member(ID_B) and not await private.is_member(ID_C)
        now[0] += REFRESH_S
        certified.add(ID_C)  # what reading the peer records taught the validator
        assert await private.admit_stream(ID_C) and peers.reads == 3

    asyncio.run(scenario())
