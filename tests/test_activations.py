"""protocol/pipeline/activations.py: pipeline frames round-trip for every dtype, fp32 activations shrink to fp16/bf16
on the wire within their rounding bounds, and every malformed frame is refused with a one-line WireError from
its header, before a tensor (or anything sized by the frame's claims) is allocated. One test sends a 1-MB
activation and its reply over a real libp2p stream (two p2pd daemons in this process)."""

from __future__ import annotations

import asyncio
import tracemalloc

import msgpack
import pytest
import torch

from node.runtime.p2pd import OwnedP2PDaemon
from protocol.pipeline.activations import (
    ACTIVATION_PROTOCOL_VERSION,
    FRAME_OVERHEAD,
    MAX_REASON,
    BackwardReply,
    BackwardRequest,
    ErrorReply,
    ExpectedTensor,
    ForwardReply,
    ForwardRequest,
    activation_from_wire,
    activation_to_wire,
    decode_tensor,
    dtype_name,
    encode_tensor,
    max_frame_bytes,
    new_micro_batch_id,
)
from protocol.streams import close_quietly, read_frame, write_frame
from protocol.wire import WireError

H = 16
HIDDEN = ExpectedTensor.hidden(max_batch=4, max_seq=32, hidden=H)
MB = 0xDEADBEEF01234567


def hidden(b=2, t=8, seed=0) -> torch.Tensor:
    return torch.randn(b, t, H, generator=torch.Generator().manual_seed(seed))


def sample(dtype: str) -> torch.Tensor:
    if dtype == "int64":
        return torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(1))
    return hidden().to(getattr(torch, dtype))


# ---- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64"])
def test_every_dtype_round_trips_exactly(dtype):
    t = sample(dtype)
    expected = ExpectedTensor.token_ids(4, 32, 1000) if dtype == "int64" else ExpectedTensor.hidden(
        4, 32, H, compute_dtype=None)
    req = activation_from_wire(activation_to_wire(ForwardRequest("job-1", 2, MB, 7, t)), ForwardRequest, expected)
    assert (req.pipeline, req.stage, req.micro_batch, req.step) == ("job-1", 2, MB, 7)
    assert req.tensor.dtype == t.dtype and torch.equal(req.tensor, t)
    req.tensor.add_(1)  # the decoded tensor owns writable memory (no warning, no aliasing)
    assert not torch.equal(req.tensor, t)


def test_every_frame_kind_round_trips():
    x, g = hidden(seed=1), hidden(seed=2)
    like = ExpectedTensor.like(x)
    cases = [(ForwardReply(MB, x), ForwardReply, like), (BackwardRequest(MB, g), BackwardRequest, like),
             (BackwardReply(MB, g), BackwardReply, like), (BackwardReply(MB, None), BackwardReply, None)]
    for msg, kind, expected in cases:
        got = activation_from_wire(activation_to_wire(msg), kind, expected, micro_batch=MB)
        assert type(got) is kind and got.micro_batch == MB
        t_in, t_out = (msg.tensor, got.tensor) if kind is ForwardReply else (msg.grad, got.grad)
        assert (t_in is None and t_out is None) or torch.equal(t_in, t_out)
    error = activation_from_wire(activation_to_wire(ErrorReply(MB, "CUDA out of memory.\n  Tried  to allocate")),
                                 ForwardReply, like, micro_batch=MB)
    assert error == ErrorReply(MB, "CUDA out of memory. Tried to allocate")
    assert len(ErrorReply(1, "x" * 1000).reason) == MAX_REASON
    assert 0 <= new_micro_batch_id() < 2**64 and new_micro_batch_id() != new_micro_batch_id()


@pytest.mark.parametrize("wire, rel_bound, dtype", [("fp16", 2**-11, "float16"), ("bf16", 2**-8, "bfloat16")])
def test_fp32_activations_travel_compressed_within_rounding_error(wire, rel_bound, dtype):
    x = hidden(4, 32, seed=3) * 10
    exact = activation_to_wire(ForwardRequest("job", 1, MB, 0, x))
    small = activation_to_wire(ForwardRequest("job", 1, MB, 0, x), wire_dtype=wire)
    assert len(small) < len(exact) / 2 + 200  # half the bytes, plus the same header
    assert msgpack.unpackb(small)["tensor"]["dtype"] == dtype
    got = activation_from_wire(small, ForwardRequest, HIDDEN).tensor
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.all((got - x).abs() <= rel_bound * x.abs())  # round to nearest: half an ulp of the value
    ids = torch.arange(6).reshape(1, 6)  # token ids never change dtype, whatever wire_dtype says
    frame = activation_to_wire(ForwardRequest("job", 0, MB, 0, ids), wire_dtype=wire)
    assert torch.equal(activation_from_wire(frame, ForwardRequest, ExpectedTensor.token_ids(4, 32, 10)).tensor, ids)


def test_a_sender_cannot_put_nan_overflow_or_the_wrong_kind_on_the_wire():
    with pytest.raises(ValueError, match="NaN or Inf as float32"):
        encode_tensor(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"NaN or Inf as float16 \(out of its range\?\)"):
        encode_tensor(torch.tensor([1e5]), wire_dtype="fp16")
    with pytest.raises(ValueError, match="a int64 tensor cannot travel as bfloat16"):
        encode_tensor(torch.arange(3), wire_dtype="bf16")
    with pytest.raises(ValueError, match="dtype torch.float64 is not one of"):
        encode_tensor(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of"):
        encode_tensor(torch.zeros(2), wire_dtype="fp8")
    with pytest.raises(ValueError, match="micro_batch: expected an integer in"):
        ForwardReply(2**64, torch.zeros(1))
    with pytest.raises(TypeError, match="not an activation frame"):
        activation_to_wire(object())
    assert dtype_name(torch.bfloat16) == dtype_name("bf16") == "bfloat16"


# ---- refusals ----------------------------------------------------------------------------------------------


def frame(**changes) -> bytes:
    """A valid ForwardRequest frame for HIDDEN with fields replaced (None removes one); tensor.<key> edits the
    tensor map."""
    body = msgpack.unpackb(activation_to_wire(ForwardRequest("job", 1, MB, 3, hidden())))
    for key, value in changes.items():
        target, key = (body["tensor"], key[len("tensor_"):]) if key.startswith("tensor_") else (body, key)
        if value is None:
            del target[key]
        else:
            target[key] = value
    return msgpack.packb(body, use_bin_type=True)


RAW = bytes(msgpack.unpackb(frame())["tensor"]["raw"])
NAN32, INF32 = b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"


@pytest.mark.parametrize("data, message", [
    # wrong dtype
    (frame(tensor_dtype="float64"), r"fwd.tensor.dtype: 'float64' is not one of float32, float16, bfloat16"),
    (frame(tensor_dtype="int64"), r"fwd.tensor.dtype: 'int64' is not one of"),
    (frame(tensor_dtype=7), r"fwd.tensor.dtype: 7 is not one of"),
    # shape mismatch
    (frame(tensor_shape=[2, 8]), r"fwd.tensor.shape: expected 3 dimensions, got \[2, 8\]"),
    (frame(tensor_shape=[2, 8, H + 1]), rf"fwd.tensor.shape\[2\]: {H + 1} where {H} is expected"),
    (frame(tensor_shape=[5, 8, H]), r"fwd.tensor.shape\[0\]: 5 where \[1, 4\] is expected"),
    (frame(tensor_shape=[0, 8, H]), r"fwd.tensor.shape\[0\]: 0 where \[1, 4\] is expected"),
    (frame(tensor_shape=[2, 10**12, H]), r"fwd.tensor.shape\[1\]: 1000000000000 where \[1, 32\] is expected"),
    (frame(tensor_shape=[2, -8, H]), r"fwd.tensor.shape\[1\]: -8 where"),
    (frame(tensor_shape="2x8x16"), r"fwd.tensor.shape: expected 3 dimensions, got '2x8x16'"),
    (frame(tensor_shape=[2, 8.0, H]), r"fwd.tensor.shape\[1\]: 8.0 where"),
    (frame(tensor_shape=[True, 8, H]), r"fwd.tensor.shape\[0\]: True where"),
    # byte size vs shape: truncated, padded
    (frame(tensor_raw=RAW[:-1]), rf"fwd.tensor.raw: {len(RAW) - 1} bytes for shape \(2, 8, {H}\) of float32 "
                                 rf"\({len(RAW)} expected\)"),
    (frame(tensor_raw=RAW + b"\0" * 4), rf"fwd.tensor.raw: {len(RAW) + 4} bytes for shape"),
    (frame(tensor_raw=RAW.decode("latin-1")), "fwd.tensor.raw: expected bytes, got str"),
    # NaN / Inf
    (frame(tensor_raw=NAN32 + RAW[4:]), "fwd.tensor: holds NaN or Inf"),
    (frame(tensor_raw=RAW[:-4] + INF32), "fwd.tensor: holds NaN or Inf"),
    # unknown, missing, mistyped fields
    (frame(extra=1), "fwd: unknown field 'extra'"),
    (frame(tensor_strides=[1]), "fwd.tensor: unknown field 'strides'"),
    (frame(step=None), "fwd: missing field 'step'"),
    (frame(tensor_raw=None), "fwd.tensor: missing field 'raw'"),
    (frame(tensor=[1, 2]), "fwd.tensor: expected a map, got list"),
    (frame(mb="abc"), r"fwd.mb: expected an integer in \[0, 18446744073709551615\], got 'abc'"),
    (frame(mb=True), "fwd.mb: expected an integer"),
    (frame(stage=-1), r"fwd.stage: expected an integer in \[0, 4095\]"),
    (frame(step=1.5), "fwd.step: expected an integer"),
    (frame(train=1), "fwd.train: expected true or false, got 1"),
    (frame(train=None), "fwd: missing field 'train'"),
    (frame(pipeline=""), "fwd.pipeline: expected 1 to 128 characters"),
    (frame(pipeline="p" * 129), "fwd.pipeline: expected 1 to 128 characters"),
    (frame(v=1), "fwd: unsupported activation protocol version 1"),  # before ForwardRequest.train
    (frame(v=None), "fwd: missing field 'v'"),
    (frame(t="bwd"), "expected a 'fwd' frame, got 'bwd'"),
    (frame(t="error"), "expected a 'fwd' frame, got 'error'"),  # an error is a reply, never a request
    (msgpack.packb([1, 2, 3]), "activation frame: expected a map, got list"),
    (b"\xc1\x00", "undecodable msgpack"),
    (msgpack.packb({"t": "fwd", 1: 2}), "undecodable msgpack"),  # non-string map keys
    (msgpack.packb(msgpack.ExtType(3, b"x")), "msgpack ext type 3 is not allowed on the wire"),
])
def test_malformed_frames_are_refused_with_one_line(data, message):
    with pytest.raises(WireError, match=message) as caught:
        activation_from_wire(data, ForwardRequest, HIDDEN)
    assert "\n" not in str(caught.value)


def test_replies_are_checked_against_the_micro_batch_asked_for():
    like = ExpectedTensor.like(hidden())
    late = activation_to_wire(ForwardReply(MB + 1, hidden()))
    with pytest.raises(WireError, match=f"reply for micro-batch {MB + 1:016x}, expected {MB:016x}"):
        activation_from_wire(late, ForwardReply, like, micro_batch=MB)
    with pytest.raises(WireError, match="expected a 'fwd_reply' frame, got 'bwd_reply'"):
        activation_from_wire(activation_to_wire(BackwardReply(MB, hidden())), ForwardReply, like)
    with pytest.raises(WireError, match="fwd_reply.tensor.shape\\[1\\]: 9 where 8 is expected"):
        activation_from_wire(activation_to_wire(ForwardReply(MB, hidden(2, 9))), ForwardReply, like)
    with pytest.raises(WireError, match="the first stage's reply carries no input gradient"):
        activation_from_wire(activation_to_wire(BackwardReply(MB, hidden())), BackwardReply, None)
    with pytest.raises(WireError, match="bwd_reply.grad: missing input gradient"):
        activation_from_wire(activation_to_wire(BackwardReply(MB, None)), BackwardReply, like)
    bad_reason = msgpack.packb({"t": "error", "v": ACTIVATION_PROTOCOL_VERSION, "mb": MB, "reason": "two\nlines"})
    with pytest.raises(WireError, match="error.reason: expected one line of at most 256 characters"):
        activation_from_wire(bad_reason, ForwardReply, like)
    with pytest.raises(TypeError, match="always carries a tensor"):
        activation_from_wire(late, ForwardReply, None)


def test_token_ids_outside_the_vocabulary_are_refused():
    expected = ExpectedTensor.token_ids(4, 32, vocab=100)
    for bad in (100, -1):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(WireError, match=r"fwd.tensor: values outside \[0, 99\]"):
            activation_from_wire(activation_to_wire(ForwardRequest("job", 0, MB, 0, ids)), ForwardRequest, expected)
    floats = activation_to_wire(ForwardRequest("job", 0, MB, 0, torch.zeros(1, 3)))
    with pytest.raises(WireError, match="fwd.tensor.dtype: 'float32' is not one of int64"):
        activation_from_wire(floats, ForwardRequest, expected)


def test_a_huge_declared_shape_is_refused_from_its_header_without_allocating():
    """A 40-byte frame claiming 10**9 float32 elements (4 GB) against a receiver that takes up to 10**6 of them:
    refused from the shape, and decoding allocates nothing near even the receiver's own bound."""
    expected = ExpectedTensor(("float32",), ((1, 10**6),), "float32")
    data = msgpack.packb({"t": "fwd_reply", "v": ACTIVATION_PROTOCOL_VERSION, "mb": MB,
                          "tensor": {"dtype": "float32", "shape": [10**9], "raw": b"\0" * 16}})
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match=r"fwd_reply.tensor.shape\[0\]: 1000000000 where \[1, 1000000\]"):
            activation_from_wire(data, ForwardReply, expected)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
    # the raw bytes must match the declared shape, so a small raw under a big in-bound shape is refused too
    data = msgpack.packb({"t": "fwd_reply", "v": ACTIVATION_PROTOCOL_VERSION, "mb": MB,
                          "tensor": {"dtype": "float32", "shape": [10**6], "raw": b"\0" * 16}})
    with pytest.raises(WireError, match=r"16 bytes for shape \(1000000,\) of float32 \(4000000 expected\)"):
        activation_from_wire(data, ForwardReply, expected)


def test_a_frame_longer_than_the_receivers_bound_is_refused_before_its_body_is_read():
    bound = max_frame_bytes(HIDDEN)
    assert bound == FRAME_OVERHEAD + 4 * 32 * H * 4  # max batch * max seq * hidden * float32
    too_long = activation_to_wire(ForwardRequest("job", 1, MB, 0, torch.zeros(4, 32, H))) + b"\0" * bound
    with pytest.raises(WireError, match=f"exceeds the {bound}-byte limit"):
        activation_from_wire(too_long, ForwardRequest, HIDDEN)

    async def stream_header_only():
        reader = asyncio.StreamReader()
        reader.feed_data((2**31 - 1).to_bytes(4, "big"))  # the body never comes: read_frame must not wait for it
        return await read_frame(reader, bound)

    with pytest.raises(WireError, match=f"peer announced a 2147483647-byte frame; at most {bound} expected here"):
        asyncio.run(stream_header_only())


def test_expected_tensor_arguments_are_checked():
    with pytest.raises(ValueError, match="mixes float and integer dtypes"):
        ExpectedTensor(("float32", "int64"), (3,))
    with pytest.raises(ValueError, match="compute_dtype: float32 cannot hold int64 values"):
        ExpectedTensor(("int64",), (3,), "float32")
    with pytest.raises(ValueError, match="value_range: .* int64 tensors only"):
        ExpectedTensor(("float32",), (3,), value_range=(0, 1))
    with pytest.raises(ValueError, match=r"shape\[0\] high bound"):
        ExpectedTensor(("float32",), ((5, 4),))
    with pytest.raises(ValueError, match="does not fit one frame"):
        ExpectedTensor.hidden(1024, 1024, 1024)  # 4 GiB of float32
    with pytest.raises(ValueError, match="name at least one wire dtype"):
        ExpectedTensor((), (3,))
    empty = ExpectedTensor(("float32",), ((0, 4), 3))  # zero-size tensors are legal where the bounds allow
    assert decode_tensor(encode_tensor(torch.zeros(0, 3)), empty).shape == (0, 3)


# ---- over a real stream ------------------------------------------------------------------------------------


def test_a_bf16_activation_and_its_reply_cross_a_real_libp2p_stream(tmp_path):
    x = torch.randn(4, 256, 256, generator=torch.Generator().manual_seed(5))  # 1 MiB of float32
    expected = ExpectedTensor.hidden(8, 512, 256)
    protocol = "swarmnode/test/stage/1/forward"

    async def serve(info, reader, writer):
        try:
            req = activation_from_wire(await read_frame(reader, max_frame_bytes(expected)), ForwardRequest, expected)
            out = req.tensor * 2
            await write_frame(writer, activation_to_wire(ForwardReply(req.micro_batch, out), wire_dtype="bf16"))
        finally:
            close_quietly(writer)

    async def scenario():
        daemons = []
        try:
            for _ in range(2):
                join = [str((await d.p2p.get_visible_maddrs())[0]) for d in daemons]
                daemons.append(OwnedP2PDaemon())
                await daemons[-1].start(identity_path=None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=join)
            host, client = daemons[0].p2p, daemons[1].p2p
            await host.add_binary_stream_handler(protocol, serve)
            mb = new_micro_batch_id()
            _, reader, writer = await client.call_binary_stream_handler(host.peer_id, protocol)
            try:
                await write_frame(writer, activation_to_wire(ForwardRequest("job", 1, mb, 0, x), wire_dtype="bf16"))
                data = await asyncio.wait_for(read_frame(reader, max_frame_bytes(ExpectedTensor.like(x))), 30)
                return len(data), activation_from_wire(data, ForwardReply, ExpectedTensor.like(x), micro_batch=mb)
            finally:
                close_quietly(writer)
        finally:
            for d in daemons:
                await d.stop()

    size, reply = asyncio.run(scenario())
    assert size < x.numel() * 2 + FRAME_OVERHEAD  # bf16 both ways: half the float32 bytes
    assert reply.tensor.dtype == torch.float32
    assert torch.all((reply.tensor - 2 * x).abs() <= 2**-7 * (2 * x).abs())  # two bf16 roundings
