"""ControlClient: how the CLI reaches a running daemon (Unix socket, or loopback TCP with the token)."""

from __future__ import annotations

import json

import grpc

from node.api.rpc import control_pb2 as pb
from node.api.rpc import control_pb2_grpc as pb_grpc
from node.api.service import TOKEN_METADATA, read_token
from node.runtime.config import NodeConfig
from node.runtime.errors import EXIT_FAILURE, EXIT_USAGE, NodeError


class ControlClient:
    def __init__(self, config: NodeConfig, timeout: float = 30.0):
        self.config, self.timeout = config, timeout
        self._metadata: tuple = ()
        if config.control == "unix":
            if not config.socket_path.exists():
                raise NodeError(
                    f"no swarmnode daemon is running for home {config.home_dir} (no control socket at "
                    f"{config.socket_path}); start one with `swarmnode run`",
                    EXIT_FAILURE,
                )
            target = f"unix:{config.socket_path}"
        else:
            target = self._tcp_target()
            try:
                self._metadata = ((TOKEN_METADATA, read_token(config.token_path)),)
            except OSError as e:
                raise NodeError(f"cannot read the control token {config.token_path}: {e.strerror}",
                                EXIT_FAILURE) from None
        self.target = target
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.ControlStub(self._channel)

    def _tcp_target(self) -> str:
        """The TCP endpoint the daemon bound (port 0 resolves to a real port in node.json)."""
        address = self.config.control[len("tcp://") :]
        if address.endswith(":0"):
            try:
                address = json.loads(self.config.state_path.read_text())["control"][len("tcp://") :]
            except (OSError, ValueError, KeyError):
                raise NodeError(f"no swarmnode daemon is running for home {self.config.home_dir}",
                                EXIT_FAILURE) from None
        return address

    def _call(self, method: str, request, timeout: float | None = None):
        timeout = timeout or self.timeout
        try:
            return getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise NodeError(
                    f"the swarmnode daemon for home {self.config.home_dir} is not answering at {self.target}",
                    EXIT_FAILURE,
                ) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise NodeError(f"the daemon refused the control token in {self.config.token_path}",
                                EXIT_FAILURE) from None
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise NodeError(e.details(), EXIT_USAGE) from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise NodeError(e.details(), EXIT_FAILURE) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise NodeError(f"the daemon did not answer {method} within {timeout:.0f} s", EXIT_FAILURE) from None
            raise NodeError(f"{method} failed: {e.details()}", EXIT_FAILURE) from None

    def status(self) -> pb.StatusResponse:
        return self._call("Status", pb.StatusRequest())

    def peers(self) -> pb.PeersResponse:
        return self._call("Peers", pb.PeersRequest())

    def doctor(self) -> pb.DoctorResponse:
        return self._call("Doctor", pb.DoctorRequest())

    def submit(self, job_toml: str, source: str) -> pb.SubmitResponse:
        return self._call("Submit", pb.SubmitRequest(job_toml=job_toml, source=source))

    def jobs(self) -> pb.JobsResponse:
        return self._call("Jobs", pb.JobsRequest())

    def cancel(self, job_id: str) -> pb.CancelResponse:
        return self._call("Cancel", pb.CancelRequest(job_id=job_id))

    def export(self, job_id: str, out_dir: str, timeout: float = 300.0, merge: bool = False) -> pb.ExportResponse:
        """The daemon may first download the model from a participant: allow it minutes, not seconds."""
        return self._call("Export", pb.ExportRequest(job_id=job_id, out_dir=out_dir, merge=merge), timeout)

    def job(self, job_id: str, follow: bool = False):
        """Job states as they change (one if not following); the stream ends with the job."""
        try:
            yield from self._stub.Job(pb.JobRequest(job_id=job_id, follow=follow), metadata=self._metadata,
                                      timeout=None if follow else self.timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise NodeError(e.details(), EXIT_USAGE) from None
            raise NodeError(f"Job failed: {e.details()}", EXIT_FAILURE) from None

    def leave(self) -> pb.LeaveResponse:
        return self._call("Leave", pb.LeaveRequest())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
