"""What crosses the wire between swarmnode nodes, with no daemon state (never imports node/). One subpackage per
role; the modules at the top serve them all:

    wire.py     the one place that speaks msgpack (pack, unpack_bounded, checked field readers, from_map)
    streams.py  length-prefixed frames on libp2p streams, and the one way streams are opened, served and closed
    clock.py    Clock: what every component with a timeout reads (SYSTEM_CLOCK, or a test's virtual clock)
    rejections.py  what this process refused from peers, counted by what and why (the node's /metrics reads it)
    records/    what nodes publish in the DHT (peer records, job specs, records and progress) and its validators
    allreduce/  the top-k all-reduce round (Averager, matchmaking, messages, sparsify, codecs)
    pipeline/   pipeline frames and control messages, the sealed direct path
    planning/   pure planning the simulator shares: spans, the federated round policy, stage plans and assignment
    transfer/   bulk transfers: shard manifests and downloads, a federated job's state
    relay/      reaching peers behind NATs: relays run by reachable peers, sealed end to end; the dial-back check

Every public name below also resolves as ``protocol.<name>``, lazily (PEP 562), so importing one light module
(e.g. protocol.wire from the CLI) does not pull in torch or hivemind.
"""

import importlib

_EXPORTS = {
    "allreduce.averager": ["Averager"],
    "allreduce.codecs": ["Codec", "CodecError", "DenseCodec", "EncodedUpdate", "SparseCodec", "smallest_encoding"],
    "allreduce.faults": ["Fault", "mangle_part"],
    "allreduce.matchmaking": ["choose_leader", "discover", "make_plan"],
    "allreduce.messages": ["CommitFrame", "GroupPlan", "Invite", "InviteReply", "PartFrame", "ResultFrame",
                           "TensorSpec", "message_from_wire", "message_to_wire"],
    "allreduce.rounds": ["Phase", "RoundConfig", "RoundHooks", "RoundOutcome", "RoundReport"],
    "allreduce.sparsify": ["ErrorFeedbackSparsifier", "SparseUpdate", "topk_approx", "topk_exact"],
    "clock": ["Clock", "SYSTEM_CLOCK"],
    "pipeline.activations": ["BackwardReply", "BackwardRequest", "ErrorReply", "ExpectedTensor", "ForwardReply",
                             "ForwardRequest", "activation_from_wire", "activation_to_wire", "decode_tensor",
                             "encode_tensor", "max_frame_bytes"],
    "pipeline.control": ["BackupAck", "Commit", "CommitReply", "ControlError", "EndStep", "EndStepReply",
                         "MemberRecord", "Resync", "StateHead", "StateRequest", "Status", "StatusReply",
                         "control_from_wire", "control_to_wire", "member_record_from_wire", "member_record_to_wire",
                         "pipe_protocol", "stage_key", "stage_protocol"],
    "planning.partition": ["plan_spans", "span_sizes"],
    "planning.round_policy": ["RoundPolicy"],
    "planning.stage_assign": ["Assignment", "Move", "NodeSpec", "Rebalance", "assign_nodes", "rebalance_join",
                              "rebalance_leave"],
    "planning.stage_plan": ["Host", "StagePlan", "plan_balanced", "plan_layer_wise", "plan_memory_aware",
                            "plan_stages"],
    "records.job_records": ["JobProgress", "JobRecord"],
    "records.job_spec": ["InnerOpt", "JobSpec", "ModelSpec", "OuterOpt", "job_id_for"],
    "records.job_validation": ["SignedJobRecordValidator"],
    "records.peer": ["Capability", "GpuInfo", "PeerRecord", "peer_record_from_wire", "peer_record_to_wire",
                     "swarm_key"],
    "records.peer_keys": ["libp2p_private_key", "peer_id_of", "public_key_from_peer_id"],
    "records.validation": ["SignedPeerRecordValidator"],
    "streams": ["Stream", "open_stream", "read_frame", "request", "serve", "write_frame"],
    "transfer.job_state": ["StateHeader", "fetch_job_state", "serve_job_state"],
    "transfer.shard_transfer": ["ServeFault", "ShardServer", "ShardTransferError", "fetch_shard", "shard_protocol"],
    "transfer.shards": ["ShardError", "ShardInfo", "ShardManifest", "TiedWeight", "check_shard_bytes",
                        "manifest_from_wire", "manifest_to_wire", "sign_manifest", "verify_manifest"],
    "wire": ["WireError", "pack", "unpack_bounded"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(f"protocol.{_WHERE[name]}"), name)
