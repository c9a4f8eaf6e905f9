"""The local control API's server: a gRPC servicer (grpc.aio) over any NodeService, on a 0600 Unix socket or on
loopback TCP with a token.

    server, endpoint = await start_control_server(daemon, config)   # daemon: a NodeService (node/api/service.py)
    ...
    await server.stop(grace=0.2)

Messages come from and go to Python through node/api/serde.py; the node-to-node wire is protocol/'s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import pathlib
import secrets
from typing import NoReturn, Protocol

import grpc

from node.api.rpc import control_pb2 as pb
from node.api.rpc import control_pb2_grpc as pb_grpc
from node.api.serde import doctor_to_proto, job_to_proto, peers_to_proto, status_to_proto
from node.api.service import TOKEN_METADATA, NodeService
from node.runtime.config import NodeConfig
from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write

logger = logging.getLogger(__name__)
FOLLOW_HEARTBEAT_S = 2.0  # a followed job's state is re-sent at least this often, changed or not
FOLLOW_POLL_S = 0.5


class _Context(Protocol):
    """The part of grpc.aio.ServicerContext used here. grpc ships no type information, so without this mypy
    cannot tell that abort always raises (it ends the RPC with that status)."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn: ...


def _status(error: NodeError) -> grpc.StatusCode:
    return grpc.StatusCode.INVALID_ARGUMENT if error.exit_code == EXIT_USAGE else grpc.StatusCode.FAILED_PRECONDITION


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, service: NodeService):
        self.service = service

    async def Status(self, request: pb.StatusRequest, context: _Context) -> pb.StatusResponse:
        return status_to_proto(self.service.status())

    async def Peers(self, request: pb.PeersRequest, context: _Context) -> pb.PeersResponse:
        return peers_to_proto(await self.service.peers(), self.service.peer_id)

    async def Doctor(self, request: pb.DoctorRequest, context: _Context) -> pb.DoctorResponse:
        return doctor_to_proto(await self.service.doctor())

    async def Submit(self, request: pb.SubmitRequest, context: _Context) -> pb.SubmitResponse:
        try:
            return pb.SubmitResponse(job_id=await self.service.submit(request.job_toml, request.source or "job file"))
        except NodeError as e:
            await context.abort(_status(e), str(e))

    async def Jobs(self, request: pb.JobsRequest, context: _Context) -> pb.JobsResponse:
        return pb.JobsResponse(jobs=[job_to_proto(summary) for summary in await self.service.list_jobs()])

    async def Job(self, request: pb.JobRequest, context: _Context):
        last, sent_at = None, 0.0
        loop = asyncio.get_running_loop()
        while True:
            summary = await self.service.job(request.job_id)
            if summary is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id} in this swarm")
            info = job_to_proto(summary)
            if info != last or loop.time() - sent_at >= FOLLOW_HEARTBEAT_S:  # a follower's clock ticks too
                yield info
                last, sent_at = info, loop.time()
            if not request.follow or summary.view.state in ("done", "cancelled"):
                return
            await asyncio.sleep(FOLLOW_POLL_S)

    async def Cancel(self, request: pb.CancelRequest, context: _Context) -> pb.CancelResponse:
        try:
            return pb.CancelResponse(cancelled=await self.service.cancel(request.job_id))
        except NodeError as e:
            await context.abort(_status(e), str(e))

    async def Export(self, request: pb.ExportRequest, context: _Context) -> pb.ExportResponse:
        out = pathlib.Path(request.out_dir)
        if not out.is_absolute():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"export directory must be absolute, got {str(out)!r:.200}")
        try:
            files = await self.service.export(request.job_id, out, request.merge)
        except NodeError as e:
            await context.abort(_status(e), str(e))
        except OSError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot write to {out}: {e.strerror}")
        manifest = json.loads(next(f for f in files if f.name == "manifest.json").read_text())
        return pb.ExportResponse(files=[str(f) for f in files], round=manifest["rounds"],
                                 model_hash=manifest["model_hash"])

    async def Leave(self, request: pb.LeaveRequest, context: _Context) -> pb.LeaveResponse:
        return pb.LeaveResponse(withdrawn=await self.service.leave())


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


async def start_control_server(service: NodeService, config: NodeConfig) -> tuple[grpc.aio.Server, str]:
    """Bind the control API as ``config`` says; return the server and the endpoint clients connect to."""
    if config.control == "unix":
        sock = config.socket_path
        sock.unlink(missing_ok=True)  # a stale socket from a killed daemon (we hold the home lock)
        server = grpc.aio.server()
        pb_grpc.add_ControlServicer_to_server(ControlServicer(service), server)
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
        pb_grpc.add_ControlServicer_to_server(ControlServicer(service), server)
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
