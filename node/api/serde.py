"""The one place that converts the control API's protobuf messages (node/api/rpc/) to and from Python.

    pb_status = status_to_proto(service.status())     # daemon side (node/api/server.py)
    pb_info = job_to_proto(summary)
    print(json.dumps(job_json(pb_info)))               # client side (the CLI's --json output)

``x_to_proto`` builds a message from the daemon's own objects (node/api/service.py); ``x_json`` turns a received
message into the plain dict the CLI prints with ``--json`` (NaN as null, optional fields as null). The CLI's
tables and lines (node/cli/format.py) read the same messages.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from node.api.rpc import control_pb2 as pb

if TYPE_CHECKING:  # the CLI imports this module: no hivemind or torch at its start
    from node.api.service import JobSummary, NodeStatus
    from node.runtime.doctor import Report
    from node.runtime.membership import PeerView
    from protocol.records.peer import Capability
    from protocol.relay.circuits import RelayStats

# ---- daemon -> proto ---------------------------------------------------------------------------------------


def capability_to_proto(cap: Capability) -> pb.Capability:
    msg = pb.Capability(
        gpus=[
            pb.Gpu(name=g.name, memory_bytes=g.memory_bytes, cc_major=g.compute_capability[0],
                   cc_minor=g.compute_capability[1])
            for g in cap.gpus
        ],
        cpu_cores=cap.cpu_cores,
        ram_bytes=cap.ram_bytes,
        disk_free_bytes=cap.disk_free_bytes,
        tflops_fp32=cap.tflops_fp32,
        platform=cap.platform,
        train_device=cap.train_device,
    )
    if cap.tflops_bf16 is not None:
        msg.tflops_bf16 = cap.tflops_bf16
    if cap.device_free_bytes is not None:
        msg.device_free_bytes = cap.device_free_bytes
    return msg


def status_to_proto(status: NodeStatus) -> pb.StatusResponse:
    return pb.StatusResponse(
        peer_id=status.peer_id, addrs=list(status.addrs), swarm=status.swarm, version=status.version,
        uptime_s=status.uptime_s, peers_seen=status.peers_seen, last_heartbeat_age_s=status.last_heartbeat_age_s,
        capability=capability_to_proto(status.capability) if status.capability is not None else None,
        home=status.home, pid=status.pid, reachability=status.reachability,
        relay=relay_counters(status.relay) if status.relay is not None else None, dashboard=status.dashboard,
    )


def relay_counters(stats: RelayStats) -> pb.RelayCounters:
    return pb.RelayCounters(reservations=stats.reservations, circuits=stats.circuits,
                            circuits_total=stats.circuits_total, bytes_relayed=stats.bytes_relayed, cut=stats.cut,
                            refused=sum(stats.refused.values()))


def peers_to_proto(views: list[PeerView], own: str) -> pb.PeersResponse:
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
                reachability=v.record.reachability,
                relays=list(v.record.relays),
                relay_service=v.record.relay_service,
            )
            for v in sorted(views, key=lambda v: v.record.peer_id)
        ]
    )


def job_to_proto(summary: JobSummary) -> pb.JobInfo:
    view, local = summary.view, summary.local
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
        exclusions=[pb.Exclusion(peer_id=peer, by=by, evidence=why)
                    for (peer, by), why in sorted(view.exclusions.items())],
    )
    if record.assignment is not None:
        info.stage_hosts.extend(",".join(group) for group in record.assignment.hosts)
    if local is not None:
        info.local_round, info.local_model_hash = local
    return info


# ---- proto -> JSON (the CLI's --json) ----------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def capability_json(cap: pb.Capability) -> dict:
    gpus = [{"name": g.name, "memory_bytes": g.memory_bytes, "compute_capability": f"{g.cc_major}.{g.cc_minor}"}
            for g in cap.gpus]
    return {
        "gpus": gpus,
        "cpu_cores": cap.cpu_cores,
        "ram_bytes": cap.ram_bytes,
        "disk_free_bytes": cap.disk_free_bytes,
        "tflops_fp32": cap.tflops_fp32,
        "tflops_bf16": cap.tflops_bf16 if cap.HasField("tflops_bf16") else None,
        "platform": cap.platform,
        "train_device": cap.train_device or None,
        "device_free_bytes": cap.device_free_bytes if cap.HasField("device_free_bytes") else None,
    }


def status_json(s: pb.StatusResponse) -> dict:
    return {"peer_id": s.peer_id, "addrs": list(s.addrs), "swarm": s.swarm, "version": s.version,
            "uptime_s": s.uptime_s, "peers_seen": s.peers_seen, "last_heartbeat_age_s": s.last_heartbeat_age_s,
            "home": s.home, "pid": s.pid, "capability": capability_json(s.capability),
            "reachability": s.reachability,
            "relay": relay_json(s.relay), "dashboard": s.dashboard or None}


def peers_json(resp: pb.PeersResponse) -> list[dict]:
    return [
        {"peer_id": p.peer_id, "addrs": list(p.addrs), "version": p.version,
         "capability": capability_json(p.capability), "last_seen": p.last_seen, "expires_at": p.expires_at,
         "is_self": p.is_self, "reachability": p.reachability, "relays": list(p.relays),
         "relay_service": p.relay_service}
        for p in resp.peers
    ]


def relay_json(r: pb.RelayCounters) -> dict:
    return {"reservations": r.reservations, "circuits": r.circuits, "circuits_total": r.circuits_total,
            "bytes_relayed": r.bytes_relayed, "cut": r.cut, "refused": r.refused}


def doctor_json(resp: pb.DoctorResponse) -> dict:
    return {"reachability": resp.reachability, "how": resp.how, "seen_as": list(resp.seen_as),
            "ports": list(resp.ports), "open_ports": list(resp.open_ports), "asked": list(resp.asked),
            "addrs": list(resp.addrs), "relays": list(resp.relays), "relay_errors": list(resp.relay_errors),
            "relay_service": resp.relay_service,
            "relay": relay_json(resp.relay),
            "peers": [{"peer_id": c.peer_id, "reachability": c.reachability, "route": c.route, "rtt_ms": c.rtt_ms,
                       "throughput_bytes_s": c.throughput_bytes_s, "error": c.error or None} for c in resp.peers],
            "advice": list(resp.advice)}


def job_json(info: pb.JobInfo) -> dict:
    return {"job_id": info.job_id, "name": info.name, "submitter": info.submitter, "state": info.state,
            "round": info.round, "rounds": info.rounds, "model_hash": info.model_hash,
            "participants": list(info.participants), "train_loss": _finite_or_none(info.train_loss),
            "eval_metric": _finite_or_none(info.eval_metric), "bytes_exchanged": info.bytes_exchanged,
            "round_time_s": info.round_time_s, "summary": info.summary, "declined": info.declined,
            "local_round": info.local_round if info.local_model_hash else None,
            "local_model_hash": info.local_model_hash or None,
            "stage_hosts": [group.split(",") for group in info.stage_hosts] or None,
            "declines": [{"peer_id": d.peer_id, "reason": d.reason} for d in info.declines], "takers": info.takers,
            "exclusions": [{"peer_id": x.peer_id, "by": x.by, "evidence": x.evidence} for x in info.exclusions]}


def export_json(resp: pb.ExportResponse) -> dict:
    return {"files": list(resp.files), "round": resp.round, "model_hash": resp.model_hash}


def doctor_to_proto(report: Report) -> pb.DoctorResponse:
    d, stats = report.detection, report.relay_stats
    return pb.DoctorResponse(
        reachability=d.state, how=d.how, seen_as=d.seen_as, ports=report.ports, open_ports=d.open_ports,
        asked=d.asked, addrs=report.addrs, relays=report.relays, relay_errors=report.relay_errors,
        relay_service=report.relay_service,
        relay=relay_counters(stats),
        peers=[pb.PeerCheck(peer_id=c.peer_id, reachability=c.reachability, route=c.route, rtt_ms=c.rtt_ms,
                            throughput_bytes_s=c.throughput_bytes_s, error=c.error) for c in report.peers],
        advice=report.advice,
    )
