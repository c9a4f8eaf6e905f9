"""Regression tests for the bugs tests/test_fuzz.py found, each with the exact input that found it.

Each bug is named above its test with the fix that closed it; the fuzz targets in tests/test_fuzz.py generate
these inputs again (deep and over-declared msgpack, deep JSON and TOML, huge TOML integers, non-UTF-8 files
and argv, unclamped progress, numpy counts, non-ASCII digits), so these tests keep the exact cases that first
failed. The last group checks that the limits added by those fixes refuse no legitimate message.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import safetensors.torch
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

import node.cli.main as cli
from node.api.rpc import control_pb2 as pb
from node.cli.format import format_job_line
from node.jobs.federated.export import history_from_json
from node.jobs.pipeline.stage_state import OPTIMIZERS, Refused, state_from_bytes
from node.runtime.config import resolve
from node.runtime.errors import NodeError
from protocol.allreduce.codecs import CodecError, decode_values
from protocol.allreduce.messages import MAX_CONTROL_FRAME, Invite, message_from_wire, message_to_wire
from protocol.pipeline.activations import (
    MAX_DIMS,
    MAX_FRAME_OBJECTS,
    ExpectedTensor,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
    max_frame_bytes,
)
from protocol.pipeline.control import (
    MAX_MICRO_BATCHES,
    Commit,
    CommitReply,
    StateHead,
    StatusReply,
    control_from_wire,
    control_to_wire,
)
from protocol.records.job_records import (
    MAX_JOB_RECORD_BYTES,
    job_progress_from_wire,
    job_progress_to_wire,
    job_record_from_wire,
    job_record_to_wire,
    jobs_key,
)
from protocol.records.job_spec import job_spec_from_wire, job_spec_to_wire
from protocol.records.job_validation import SignedJobRecordValidator
from protocol.records.peer import MAX_RECORD_BYTES, PeerRecord, peer_record_from_wire, peer_record_to_wire, swarm_key
from protocol.records.validation import SignedPeerRecordValidator, key_id
from protocol.transfer.job_state import state_header_from_wire, state_header_to_wire
from protocol.transfer.shards import (
    MAX_SHARDS,
    MAX_TIES,
    ShardError,
    ShardInfo,
    TiedWeight,
    manifest_from_wire,
    manifest_to_wire,
    sign_manifest,
)
from protocol.wire import MAX_DEPTH, MAX_OBJECTS, WireError, unpack_bounded
from tests.fuzzing import SLACK, fuzz, msgpack_bound
from tests.test_fuzz import (
    CAP_GPU,
    HEADERS,
    HIDDEN,
    JOB_TOML,
    KEYS,
    MANIFEST,
    PEERS,
    PROGRESS,
    RECORDS,
    SHA,
    SPECS,
    SWARM,
    activation_seeds,
    cli_env,
    round_messages,
    run_cli,
    signed_record,
    stage_state_sample,
    submit_parse,
    validator_bound,
)

__all__ = ["cli_env"]  # a fixture the CLI regressions use (imported, so pytest finds it here)

# ---- 1, 2, 3: msgpack nesting, preallocation and amplification (protocol/wire.py unpack_bounded) -------------
# Fix: unpack_bounded walks the msgpack headers first (_scan: no object built, str/bin payloads skipped in O(1))
# and refuses nesting beyond MAX_DEPTH, containers declaring more values than bytes remain, and more objects
# than the decoder's limit (MAX_OBJECTS, or its own: activation frames MAX_FRAME_OBJECTS, round messages
# MAX_ROUND_OBJECTS, manifests MAX_MANIFEST_OBJECTS) before msgpack.unpackb runs.

DEEP = b"\x91" * 1000 + b"\xc0"  # a 1000-deep array: msgpack accepts up to 1024 levels, Python's repr only ~1000


def _deep(seed: bytes, *path: str) -> bytes:
    """``seed`` (a msgpack map) with the value at ``path`` replaced by DEEP."""
    obj = msgpack.unpackb(seed, raw=False)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "\x00deep\x00"
    return msgpack.packb(obj, use_bin_type=True).replace(msgpack.packb("\x00deep\x00"), DEEP)


def _dht(record: DHTRecord, payload: bytes, key) -> DHTRecord:
    return signed_record(replace(record, value=MSGPackSerializer.dumps(payload)), key)


_PEER_PAYLOAD = peer_record_to_wire(PeerRecord(PEERS[0], (), "0.1", CAP_GPU, 1.0))
_JOB_PAYLOAD = job_record_to_wire(RECORDS[0])
DEEP_CASES = [
    ("message_from_wire", lambda d: message_from_wire(d, MAX_CONTROL_FRAME, Invite),
     _deep(message_to_wire(round_messages()[0]), "t"), (WireError,)),
    ("peer_record_from_wire", peer_record_from_wire, _deep(_PEER_PAYLOAD, "capability", "tflops_bf16"), (WireError,)),
    ("activation_from_wire", lambda d: activation_from_wire(d, ForwardRequest, HIDDEN),
     _deep(activation_seeds()[0], "mb"), (WireError,)),
    ("job_spec_from_wire", job_spec_from_wire, _deep(job_spec_to_wire(SPECS[0]), "name"), (WireError,)),
    ("job_record_from_wire", job_record_from_wire, _deep(_JOB_PAYLOAD, "state"), (WireError,)),
    ("job_progress_from_wire", job_progress_from_wire, _deep(job_progress_to_wire(PROGRESS[0]), "round"),
     (WireError,)),
    ("state_header_from_wire", state_header_from_wire,
     _deep(state_header_to_wire(HEADERS[0]), "size"), (WireError,)),
    ("manifest_from_wire", manifest_from_wire, _deep(manifest_to_wire(MANIFEST), "dtype"), (ShardError,)),
    ("control_from_wire", lambda d: control_from_wire(d, StatusReply), _deep(control_to_wire(StatusReply(3, 1, SHA)),
                                                                           "step"), (WireError,)),
]
DEEP_RECORDS = [
    ("SignedPeerRecordValidator", SignedPeerRecordValidator(SWARM),
     _dht(DHTRecord(key_id(swarm_key(SWARM, "peers")), MSGPackSerializer.dumps(PEERS[0]), b"", 1.7e9),
          _deep(_PEER_PAYLOAD, "capability", "tflops_bf16"), KEYS[0]), MAX_RECORD_BYTES + 80),
    ("SignedJobRecordValidator", SignedJobRecordValidator(SWARM),
     _dht(DHTRecord(key_id(jobs_key(SWARM)), MSGPackSerializer.dumps(RECORDS[0].job_id), b"", 1.7e9),
          _deep(_JOB_PAYLOAD, "state"), KEYS[0]), MAX_JOB_RECORD_BYTES + 96),
]


@pytest.mark.parametrize("decode, data, errors", [c[1:] for c in DEEP_CASES], ids=[c[0] for c in DEEP_CASES])
def test_deep_nesting(decode, data, errors):
    """Was: RecursionError, a ~1000-deep value made the decoder's error message ({value!r:.40}) exceed Python's
    recursion limit. Now: refused as nested deeper than MAX_DEPTH."""
    fuzz(decode, [data], errors=errors, bound=msgpack_bound(1 << 20), min_accepted=0)
    with pytest.raises(errors) as caught:
        decode(data)
    assert f"nested deeper than {MAX_DEPTH} levels" in str(caught.value)


@pytest.mark.parametrize("validator, record, limit", [c[1:] for c in DEEP_RECORDS], ids=[c[0] for c in DEEP_RECORDS])
def test_deep_nesting_in_dht_validators(validator, record, limit, caplog):
    """Was: the same RecursionError escaped both DHT validators (they catch ValueError). Now: the record is
    refused (validate returns False) with the reason logged."""
    caplog.set_level(logging.WARNING, logger="protocol.records.validation")
    fuzz(validator.validate, [record], errors=(), bound=validator_bound(limit),
         accept=lambda c, ok: ok is False or pytest.fail(f"validate returned {ok!r}"))
    assert any(f"nested deeper than {MAX_DEPTH}" in r.getMessage() for r in caplog.records)


def test_msgpack_preallocation():
    """Was: msgpack.unpackb preallocates each declared array before reading it and unpack_bounded allowed
    1024 levels: 3 bytes (0xdc 0x27 0x10: 10,000 items) per level made a 3-KB peer record allocate 80 MB.
    Now: a container declaring more values than bytes remain is refused before msgpack runs."""
    data = b"\xdc\x27\x10" * 1000 + b"\xc0"
    fuzz(peer_record_from_wire, [data], errors=(WireError,), bound=lambda d: SLACK, min_accepted=0)
    with pytest.raises(WireError, match=r"an array declares 10000 values in the 2998 bytes left"):
        peer_record_from_wire(data)
    shallow = b"\xdc\x27\x10" * 20 + b"\xc0"  # within MAX_DEPTH: the declared count alone refuses it
    with pytest.raises(WireError, match="declares 10000 values"):
        unpack_bounded(shallow, 1 << 20)


def test_msgpack_amplification():
    """Was: unpack_bounded built every object before any field check; a byte of 0x80 (an empty map) costs
    ~72 bytes, so an activation frame within its bound (133 KiB for hidden (8, 64, 64)) allocated 10 MiB.
    Now: an activation frame holds at most MAX_FRAME_OBJECTS values, refused on the header walk."""
    tensor = ExpectedTensor.hidden(8, 64, 64)
    n = max_frame_bytes(tensor) - 5
    frame = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    fuzz(lambda d: activation_from_wire(d, ForwardRequest, tensor), [frame], errors=(WireError,), min_accepted=0,
         bound=lambda d: 8 * len(d) + SLACK)
    with pytest.raises(WireError, match=f"more than {MAX_FRAME_OBJECTS} objects"):
        activation_from_wire(frame, ForwardRequest, tensor)


def test_msgpack_amplification_object_limits():
    """The same for any decoder: max_objects (MAX_OBJECTS unless the decoder names its own) caps what a frame
    of empty maps builds, however long the frame (here 16 x the limit; fuzz() traces allocations, which makes
    the header walk ~20x slower, so the traced case uses a small limit)."""
    n = 16 * 4096
    frame = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    fuzz(lambda d: unpack_bounded(d, len(d), 4096), [frame], errors=(WireError,), min_accepted=0,
         bound=lambda d: 8 * len(d) + SLACK)
    n = 4 * MAX_OBJECTS
    frame = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    with pytest.raises(WireError, match=f"more than {MAX_OBJECTS} objects"):
        unpack_bounded(frame, len(frame))


# ---- 5: deeply nested JSON (node/jobs/federated/export.py history_from_json, protocol/transfer/shards.py config_json)
# --------------- Fix: json.loads' RecursionError is caught where it is called and reported as the decoder's own error.


@pytest.mark.parametrize("decode, data, errors", [
    (history_from_json, b"[" * 3000, (ValueError,)),
    (manifest_from_wire, manifest_to_wire(MANIFEST).replace(
        msgpack.packb(MANIFEST.config_json), msgpack.packb("[" * 3000)), (ShardError,)),
], ids=["history_from_json", "manifest_from_wire-config_json"])
def test_deep_json(decode, data, errors):
    """Was: RecursionError escaped json.loads on deeply nested JSON (only ValueError was caught)."""
    fuzz(decode, [data], errors=errors, bound=lambda c: 1 << 30, min_accepted=0)
    with pytest.raises(errors, match="nested too deeply"):
        decode(data)


# ---- 4, 5, 6: job files and node config (node/jobs/spec.py, node/runtime/config.py, node/ml/models.py)
# --------------------- Fix: node/runtime/config.py parse_toml (used for job files and the node config) reports
# tomllib's RecursionError and non-UTF-8 text as NodeError, check_toml_ints refuses integers outside TOML's 64-bit range
# (also for the parsed TOML the daemon hands to job_spec_from_toml); node/ml/models.py bounds integer overrides
# (MAX_INT_OVERRIDE) and a cnn's blocks by its side before computing 2 ** blocks; NodeConfig refuses non-finite
# durations.

HUGE_LR = ('name = "x"\ndataset = "digits"\ntask = "classification"\nrounds = 3\n[model]\narch = "mlp"\n[inner]\n'
           'lr = 1' + "0" * 400 + "\n")
CNN_BLOCKS = ('name = "x"\ndataset = "digits"\ntask = "classification"\nrounds = 3\n[model]\narch = "cnn"\n'
              'blocks = 16777216\n[inner]\nlr = 0.1\n')


@pytest.mark.parametrize("text, message", [
    (HUGE_LR, "inner.lr: integer of 401 digits is outside TOML's 64-bit range"),
    (JOB_TOML[0] + "x = " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
], ids=["huge-int", "deep-nesting"])
def test_job_toml(text, message):
    """Was: OverflowError (math.isfinite of a TOML integer beyond float range) and tomllib's RecursionError
    escaped the daemon's Submit parse."""
    fuzz(submit_parse, [text], errors=(NodeError,), bound=lambda c: 1 << 30, min_accepted=0)
    with pytest.raises(NodeError, match=message):
        submit_parse(text)


def test_cnn_blocks():
    """Was: node/ml/models.py computed 2 ** blocks for a cnn: blocks = 2**24 allocated ~8 MB from a 200-byte job
    file, 2**40 (any int64 passes ModelSpec) never finished, in Submit and in _why_not for every peer's job."""
    fuzz(submit_parse, [CNN_BLOCKS], errors=(NodeError,), min_accepted=0, bound=lambda t: SLACK)
    with pytest.raises(NodeError, match=r"blocks=16777216 halves side=8 below 1 \(at most 3 blocks\)"):
        submit_parse(CNN_BLOCKS)
    with pytest.raises(NodeError, match=r"blocks must be <= 16777216, got 1099511627776"):
        submit_parse(CNN_BLOCKS.replace("16777216", str(2**40)))
    t0 = time.perf_counter()
    with pytest.raises(NodeError):
        submit_parse(CNN_BLOCKS.replace("16777216", str(2**63 - 1)))
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("text, message", [
    (b"heartbeat = 1" + b"0" * 400 + b"\n", "heartbeat: integer of 401 digits is outside TOML's 64-bit range"),
    (b'swarm = "\xff"\n', "not UTF-8 text (byte 9)"),
    (b"heartbeat = nan\n", "heartbeat must be a finite number of seconds, got nan"),
    (b"listen = " + b"[" * 1000 + b"]" * 1000 + b"\n", "not valid TOML: nested too deeply"),
    (b"ttl = inf\n", "ttl must be a finite number of seconds, got inf"),
    (b"join_attempts = " + b"1" * 5000 + b"\n", "not valid TOML: Exceeds the limit (4300 digits)"),
], ids=["huge-int", "not-utf8", "nan-heartbeat", "deep-nesting", "inf-ttl", "int-beyond-4300-digits"])
def test_config_file(tmp_path, text, message):
    """Was: OverflowError for an int beyond float range, UnicodeDecodeError for a non-UTF-8 file, tomllib's
    RecursionError (and ValueError for a literal of more than 4300 digits) escaped read_toml; NaN was accepted
    for heartbeat (and ttl: NaN compares false both ways)."""
    path = tmp_path / "node.toml"
    path.write_bytes(text)

    def decode(path):
        config = resolve({}, env={}, config_file=path)
        assert all(math.isfinite(getattr(config, f)) for f in ("heartbeat", "ttl", "join_backoff",
                                                                "benchmark_seconds")), config
        return config

    fuzz(decode, [path], errors=(NodeError,), bound=lambda c: 1 << 30, min_accepted=0)
    with pytest.raises(NodeError) as caught:
        resolve({}, env={}, config_file=path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ---- 7, 8: the CLI (node/cli/main.py) ---------------------------------------------------------------------------
# Fix: main() refuses an argument that is not valid UTF-8 (_check_utf8) before anything uses it; job files are
# read as bytes and decoded with a NodeError (_read_job_file); read_toml turns any OSError into a NodeError;
# format_job_line clamps its bar to 20 characters.


@pytest.mark.parametrize("argv, message", [
    (["cancel", "\udcff"], "job-id: '\\udcff' is not valid UTF-8"),
    (["job", "ab\udcff"], "job-id: 'ab\\udcff' is not valid UTF-8"),
    (["submit", "BINARY"], "binary.toml is not UTF-8 text (byte 8)"),
    (["status", "--config", "DIR"], "cannot read it (Is a directory)"),
    (["status", "--config", "x" * 300], "cannot read it (File name too long)"),
], ids=["cancel-surrogate", "job-surrogate", "submit-non-utf8-file", "config-directory", "config-name-too-long"])
def test_cli(tmp_path, cli_env, capsys, argv, message):
    """Was: a lone surrogate in argv (a non-UTF-8 byte, as os.fsdecode gives it) raised UnicodeEncodeError
    building the request; a non-UTF-8 job file raised UnicodeDecodeError in read_text; read_toml let OSError
    other than FileNotFoundError escape (--config naming a directory, a name longer than 255 bytes)."""
    (tmp_path / "binary.toml").write_bytes(b'name = "\xff"\n')
    argv = [a.replace("BINARY", str(tmp_path / "binary.toml")).replace("DIR", str(tmp_path)) for a in argv]
    fuzz(run_cli, [argv + cli_env], errors=(), bound=lambda c: 1 << 30, min_accepted=1,
         accept=lambda c, code: code == 2 or pytest.fail(f"exit code {code}"))
    capsys.readouterr()
    assert cli.main(argv + cli_env) == 2
    err = capsys.readouterr().err
    assert err.startswith("swarmnode: error: ") and message in err and err.count("\n") == 1, err


def test_job_line_bar():
    """Was: the progress bar was 20 * round / rounds characters, unclamped; a JobInfo with round 2**21 of 1 (a
    peer's progress record may claim up to MAX_ROUNDS) built a 42-MB line, 2**32-1 ~86 GB."""
    fuzz(format_job_line, [pb.JobInfo(round=2**21, rounds=1), pb.JobInfo(round=2**32 - 1, rounds=1)],
         errors=(), bound=lambda c: SLACK)
    assert format_job_line(pb.JobInfo(round=2**32 - 1, rounds=1)).startswith("[" + "#" * 20 + "] round")


# ---- 9, 10: a peer's numbers and names (protocol/allreduce/codecs.py, node/jobs/pipeline/stage_state.py)
# ------------------------------


@pytest.mark.parametrize("nnz", [np.uint64(2**62), np.uint64(2**64 - 1), np.int64(2**62), np.int64(-1)], ids=repr)
def test_decode_values_numpy_nnz(nnz):
    """Was: a numpy uint64 nnz overflowed nnz * itemsize (RuntimeWarning; wrapped to 0 and accepted an empty
    payload for nnz 2**62). Now: nnz is range-checked and converted to a Python int first."""
    fuzz(lambda c: decode_values(*c), [("fp32", b"", nnz)], errors=(CodecError,), bound=lambda c: SLACK,
         min_accepted=0)
    with pytest.raises(CodecError, match="nnz"):
        decode_values("fp32", b"", nnz)
    assert decode_values("fp32", b"\x00" * 12, np.uint64(3)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("index", ["\u00b2", "\u0663", "01", "1" * 5000, "-0", " 0"], ids=repr)
def test_state_unicode_digit(index):
    """Was: an optimizer tensor named opt/<i>/<slot> with a non-ASCII digit ('\u00b2'.isdigit() is True,
    int('\u00b2') raises) escaped state_from_bytes as a bare ValueError. Now: only canonical ASCII indices."""
    named, _, params_hash = stage_state_sample("sgd")
    data = safetensors.torch.save({"param/h.0.w": named[0][1].detach(), "param/h.0.b": named[1][1].detach(),
                                   f"opt/{index}/momentum_buffer": torch.zeros(4, 3)})
    head = StateHead(1, 3, len(data), hashlib.sha256(data).hexdigest(), params_hash)
    fuzz(lambda c: state_from_bytes(c, data, 1, named, OPTIMIZERS["sgd"]), [head], errors=(Refused,),
         bound=lambda c: SLACK, min_accepted=0)
    with pytest.raises(Refused, match="unexpected tensor"):
        state_from_bytes(head, data, 1, named, OPTIMIZERS["sgd"])


# ---- the limits refuse no legitimate message ------------------------------------------------------------------


def test_largest_messages_within_the_limits():
    """The messages with the most values still decode: a pipeline Commit of MAX_MICRO_BATCHES ids and its
    CommitReply (MAX_OBJECTS), a manifest of MAX_SHARDS shards and MAX_TIES ties (its own limit), an
    activation frame of MAX_DIMS dimensions (MAX_FRAME_OBJECTS)."""
    ids = tuple(range(2**64 - MAX_MICRO_BATCHES, 2**64))  # 9 bytes each, as new_micro_batch_id() draws them
    commit = Commit(3, ids)
    assert control_from_wire(control_to_wire(commit), Commit) == commit
    reply = CommitReply(3, ids[::2], ids[1::2])  # committed and missing split one commit's ids
    assert control_from_wire(control_to_wire(reply), CommitReply) == reply
    shards = tuple(ShardInfo(i, i + 1, f"stage-{i:04d}.safetensors", SHA, 2**40) for i in range(MAX_SHARDS))
    ties = tuple(TiedWeight(f"t{i}.weight", f"s{i}.weight") for i in range(MAX_TIES))
    manifest = sign_manifest(replace(MANIFEST, num_layers=MAX_SHARDS, shards=shards, tied=ties, signature=b""),
                             KEYS[0])
    assert manifest_from_wire(manifest_to_wire(manifest)) == manifest
    tensor = torch.ones((1,) * MAX_DIMS)
    expected = ExpectedTensor(("float32",), (1,) * MAX_DIMS)
    frame = activation_to_wire(ForwardRequest("p" * 128, 4095, 2**64 - 1, 2**63 - 1, tensor))
    assert activation_from_wire(frame, ForwardRequest, expected).tensor.shape == tensor.shape


def test_unpack_bounded_limits_are_exact():
    """MAX_DEPTH levels and max_objects values pass, one more of either is refused with a one-line reason."""
    deepest = b"\x91" * (MAX_DEPTH - 1) + b"\x90"
    assert unpack_bounded(deepest, 1024) is not None
    for data, message in ((b"\x91" * MAX_DEPTH + b"\x90", f"nested deeper than {MAX_DEPTH} levels"),
                          (b"\x93\x01\x02\x03", "more than 3 objects"),
                          (b"\xc6\x00\x00\x00\x09abc", "9-byte str/bin runs past the end"),
                          (b"\x92\x01\xcd\x00", "truncated"), (b"\x01\x02", "1 trailing bytes"),
                          (b"\xd6\x05\x00\x00\x00\x01", "ext type 5 is not allowed")):
        with pytest.raises(WireError, match=message) as caught:
            unpack_bounded(data, 1024, 3 if message == "more than 3 objects" else MAX_OBJECTS)
        assert "\n" not in str(caught.value)
    assert unpack_bounded(b"\x92\x01\x02", 1024, 3) == [1, 2]
