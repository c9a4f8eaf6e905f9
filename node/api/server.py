"""The local control API: gRPC servicer (grpc.aio) on a 0600 Unix socket, or loopback TCP with a token.

Proto <-> record conversion for the control API lives here; the node-to-node wire lives in protocol/wire.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import pathlib
import secrets
from typing import TYPE_CHECKING

import grpc

from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from node.api.rpc import control_pb2 as pb
from node.api.rpc import control_pb2_grpc as pb_grpc
from protocol.records.peer import Capability

if TYPE_CHECKING:
    from node.daemon import Daemon

logger = logging.getLogger(__name__)
TOKEN_METADATA = "x-swarmnode-token"
FOLLOW_HEARTBEAT_S = 2.0  # a followed job's state is re-sent at least this often, changed or not


def _status(error: NodeError) -> grpc.StatusCode:
    return grpc.StatusCode.INVALID_ARGUMENT if error.exit_code == EXIT_USAGE else grpc.StatusCode.FAILED_PRECONDITION


def capability_to_proto(cap: Capability) -> pb.Capability:
    msg = pb.Capability(
        gpus=[
            pb.Gpu(name=g.name, memory_bytes=g.memory_bytes, cc_major=g.compute_capability[0], cc_minor=g.compute_capability[1])
            for g in cap.gpus
        ],
        cpu_cores=cap.cpu_cores,
        ram_bytes=cap.ram_bytes,
        disk_free_bytes=cap.disk_free_bytes,
        tflops_fp32=cap.tflops_fp32,
        platform=cap.platform,
    )
    if cap.tflops_bf16 is not None:
        msg.tflops_bf16 = cap.tflops_bf16
    return msg


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        return self.daemon.status()

    async def Peers(self, request: pb.PeersRequest, context: grpc.aio.ServicerContext) -> pb.PeersResponse:
        views = await self.daemon.membership.peers()
        own = self.daemon.peer_id
        if not any(v.record.peer_id == own for v in views):
            views.append(self.daemon.own_view())  # our record may not have propagated back to us yet
        return pb.PeersResponse(
            peers=[
                pb.Peer(
                    peer_id=v.record.peer_id,
                    addrs=list(v.record.addrs),
                    version=v.record.version,
                    capability=capability_to_proto(v.record.capability),
                    last_seen=v.record.updated_at,
                    expires_at=v.expires_at,
                    is_self=v.record.peer_id == own,
                )
                for v in sorted(views, key=lambda v: v.record.peer_id)
            ]
        )

    async def Submit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.SubmitResponse:
        try:
            return pb.SubmitResponse(job_id=await self.daemon.jobs.submit(request.job_toml, request.source or "job file"))
        except NodeError as e:
            await context.abort(_status(e), str(e))

    async def Jobs(self, request: pb.JobsRequest, context: grpc.aio.ServicerContext) -> pb.JobsResponse:
        await self.daemon.jobs.refresh()
        return pb.JobsResponse(jobs=[job_to_proto(v, self.daemon.jobs.local_state(j)) for j, v in sorted(self.daemon.jobs.views.items())])

    async def Job(self, request: pb.JobRequest, context: grpc.aio.ServicerContext):
        last, sent_at = None, 0.0
        loop = asyncio.get_running_loop()
        while True:
            await self.daemon.jobs.refresh()
            view = self.daemon.jobs.views.get(request.job_id)
            if view is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id} in this swarm")
            info = job_to_proto(view, self.daemon.jobs.local_state(request.job_id))
            if info != last or loop.time() - sent_at >= FOLLOW_HEARTBEAT_S:  # a follower's clock ticks too
                yield info
                last, sent_at = info, loop.time()
            if not request.follow or view.state in ("done", "cancelled"):
                return
            await asyncio.sleep(0.5)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        try:
            return pb.CancelResponse(cancelled=await self.daemon.jobs.cancel(request.job_id))
        except NodeError as e:
            await context.abort(_status(e), str(e))

    async def Export(self, request: pb.ExportRequest, context: grpc.aio.ServicerContext) -> pb.ExportResponse:
        out = pathlib.Path(request.out_dir)
        if not out.is_absolute():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"export directory must be absolute, got {str(out)!r:.200}")
        try:
            files = await self.daemon.jobs.export(request.job_id, out)
        except NodeError as e:
            await context.abort(_status(e), str(e))
        except OSError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot write to {out}: {e.strerror}")
        manifest = json.loads(next(f for f in files if f.name == "manifest.json").read_text())
        return pb.ExportResponse(files=[str(f) for f in files], round=manifest["rounds"], model_hash=manifest["model_hash"])

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        withdrawn = await self.daemon.membership.withdraw()
        self.daemon.request_stop(withdrawn=True)
        return pb.LeaveResponse(withdrawn=withdrawn)


def job_to_proto(view, local: tuple[int, str] | None = None) -> pb.JobInfo:
    record, progress = view.record, view.progress
    nan = float("nan")
    info = pb.JobInfo(
        job_id=record.job_id, name=record.spec.name, submitter=record.submitter, state=view.state, round=view.round,
        rounds=record.spec.rounds, model_hash=(progress.model_hash if progress else "") or record.model_hash,
        participants=list(progress.participants if progress else record.participants),
        train_loss=progress.train_loss if progress and progress.train_loss is not None else nan,
        eval_metric=progress.eval_metric if progress and progress.eval_metric is not None else nan,
        bytes_exchanged=progress.bytes_exchanged if progress else 0,
        round_time_s=progress.round_time_s if progress else 0.0,
        summary=f"{record.spec.model.arch} on {record.spec.dataset}", declined=view.declined,
        declines=[pb.Decline(peer_id=peer, reason=reason) for peer, reason in sorted(view.declines.items())],
        takers=view.takers, round_timeout_s=record.spec.round_timeout_s,
    )
    if record.assignment is not None:
        info.stage_hosts.extend(",".join(group) for group in record.assignment.hosts)
    if local is not None:
        info.local_round, info.local_model_hash = local
    return info


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call whose metadata lacks the token stored in <home>/control.token (TCP mode)."""

    def __init__(self, token: str):
        self._token = token.encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong control token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_METADATA, "")
        if hmac.compare_digest(given.encode(), self._token):
            return await continuation(handler_call_details)
        return self._deny


async def start_control_server(daemon: "Daemon") -> tuple[grpc.aio.Server, str]:
    """Bind the control API as configured; return the server and the endpoint clients connect to."""
    config = daemon.config
    if config.control == "unix":
        sock = config.socket_path
        sock.unlink(missing_ok=True)  # a stale socket from a killed daemon (we hold the home lock)
        server = grpc.aio.server()
        pb_grpc.add_ControlServicer_to_server(ControlServicer(daemon), server)
        old_umask = os.umask(0o177)  # the socket is created 0600: no window where others may connect
        try:
            server.add_insecure_port(f"unix:{sock}")
        finally:
            os.umask(old_umask)
        endpoint = f"unix:{sock}"
    else:
        token = secrets.token_urlsafe(32)
        atomic_write(config.token_path, token.encode(), mode=0o600)
        server = grpc.aio.server(interceptors=[_TokenInterceptor(token)])
        pb_grpc.add_ControlServicer_to_server(ControlServicer(daemon), server)
        address = config.control[len("tcp://") :]
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {config.control}: {e}") from None
        endpoint = f"tcp://{address.rpartition(':')[0]}:{port}"
    await server.start()
    if config.control == "unix":
        os.chmod(config.socket_path, 0o600)
    return server, endpoint


def read_token(path: pathlib.Path) -> str:
    return pathlib.Path(path).read_text().strip()
