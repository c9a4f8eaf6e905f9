"""What crosses the wire between swarmnode nodes, with no daemon state (never imports node/).

Public names, by module:
  - records:      Capability, GpuInfo, PeerRecord, swarm_key          (what a node publishes in the DHT)
  - peer_keys:    peer_id_of, public_key_from_peer_id, libp2p_private_key (Ed25519 key <-> libp2p peer id)
  - validation:   SignedPeerRecordValidator                           (hivemind DHT record validator)
  - wire:         peer_record_to_wire / _from_wire, message_to_wire / message_from_wire, WireError
                  (the one place that (de)serialises; msgpack only)
  - messages:     TensorSpec, GroupPlan, Invite, InviteReply, PartFrame, ResultFrame, CommitFrame
  - sparsify:     SparseUpdate, ErrorFeedbackSparsifier, topk_exact, topk_approx
  - codecs:       Codec, SparseCodec, DenseCodec, EncodedUpdate, smallest_encoding, CodecError
  - partition:    plan_spans, span_sizes                              (pure span planning)
  - matchmaking:  make_plan, choose_leader, discover                  (group formation; pure parts + DHT I/O)
  - allreduce:    Averager                                            (one member's side of the round)
  - rounds:       RoundConfig, RoundHooks, RoundOutcome, RoundReport, Phase (what a round takes and reports)
  - streams:      read_frame, write_frame                             (length-prefixed frames on libp2p streams)
  - faults:       Fault, mangle_part                                  (fault injection for tests)
  - jobs:         JobSpec, ModelSpec, InnerOpt, OuterOpt, JobRecord, JobProgress, job_id_for (+ wire pairs)
  - job_validation: SignedJobRecordValidator                          (hivemind DHT validator for jobs)
  - stage_plan:   StagePlan, Host, plan_layer_wise, plan_balanced, plan_memory_aware, plan_stages (pure layer cuts)
  - stage_assign: NodeSpec, Assignment, Move, Rebalance, assign_nodes, rebalance_join, rebalance_leave
                  (pure node -> stage assignment maximising the slowest stage)
  - activations:  ForwardRequest, ForwardReply, BackwardRequest, BackwardReply, ErrorReply, ExpectedTensor,
                  activation_to_wire / activation_from_wire, encode_tensor / decode_tensor, max_frame_bytes
                  (pipeline frames between stages; fp16/bf16 on the wire optional)
  - pipeline_messages: Status, StatusReply, Commit, CommitReply, EndStep, EndStepReply, Resync, ControlError,
                  StateRequest, StateHead, BackupAck, MemberRecord, control_to_wire / control_from_wire,
                  member_record_to_wire / member_record_from_wire, stage_protocol, pipe_protocol, stage_key
                  (pipeline control between trainer and stage replicas, state transfer, DHT member records)
  - shard_transfer: ShardServer, fetch_shard, ShardTransferError, shard_protocol, ServeFault
                  (chunked, resumable, sha256-verified shard download over libp2p streams)
  - shards:       ShardManifest, ShardInfo, TiedWeight, ShardError, sign_manifest, verify_manifest,
                  check_shard_bytes, manifest_to_wire / manifest_from_wire (signed stage-shard manifests)

Names resolve lazily (PEP 562), so importing one light module (e.g. protocol.wire from the CLI) does not
pull in torch or hivemind.
"""

import importlib

_EXPORTS = {
    "records.peer": ["Capability", "GpuInfo", "PeerRecord", "swarm_key"],
    "records.peer_keys": ["peer_id_of", "public_key_from_peer_id", "libp2p_private_key"],
    "records.validation": ["SignedPeerRecordValidator"],
    "wire": ["WireError", "peer_record_to_wire", "peer_record_from_wire", "message_to_wire", "message_from_wire"],
    "allreduce.messages": ["TensorSpec", "GroupPlan", "Invite", "InviteReply", "PartFrame", "ResultFrame", "CommitFrame"],
    "allreduce.sparsify": ["SparseUpdate", "ErrorFeedbackSparsifier", "topk_exact", "topk_approx"],
    "allreduce.codecs": ["Codec", "SparseCodec", "DenseCodec", "EncodedUpdate", "smallest_encoding", "CodecError"],
    "planning.partition": ["plan_spans", "span_sizes"],
    "allreduce.matchmaking": ["make_plan", "choose_leader", "discover"],
    "allreduce.averager": ["Averager"],
    "allreduce.rounds": ["RoundConfig", "RoundHooks", "RoundOutcome", "RoundReport", "Phase"],
    "streams": ["read_frame", "write_frame"],
    "allreduce.faults": ["Fault", "mangle_part"],
    "records.jobs": ["JobSpec", "ModelSpec", "InnerOpt", "OuterOpt", "JobRecord", "JobProgress", "job_id_for"],
    "records.job_validation": ["SignedJobRecordValidator"],
    "planning.stage_plan": ["StagePlan", "Host", "plan_layer_wise", "plan_balanced", "plan_memory_aware", "plan_stages"],
    "planning.stage_assign": ["NodeSpec", "Assignment", "Move", "Rebalance", "assign_nodes", "rebalance_join", "rebalance_leave"],
    "pipeline.activations": ["ForwardRequest", "ForwardReply", "BackwardRequest", "BackwardReply", "ErrorReply",
                    "ExpectedTensor", "activation_to_wire", "activation_from_wire", "encode_tensor", "decode_tensor",
                    "max_frame_bytes"],
    "pipeline.control": ["Status", "StatusReply", "Commit", "CommitReply", "EndStep", "EndStepReply", "Resync",
                          "ControlError", "StateRequest", "StateHead", "BackupAck", "MemberRecord", "control_to_wire",
                          "control_from_wire", "member_record_to_wire", "member_record_from_wire", "stage_protocol",
                          "pipe_protocol", "stage_key"],
    "transfer.shard_transfer": ["ShardServer", "fetch_shard", "ShardTransferError", "shard_protocol", "ServeFault"],
    "transfer.shards": ["ShardManifest", "ShardInfo", "TiedWeight", "ShardError", "sign_manifest", "verify_manifest",
               "check_shard_bytes", "manifest_to_wire", "manifest_from_wire"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    return getattr(importlib.import_module(f"protocol.{_WHERE[name]}"), name)
