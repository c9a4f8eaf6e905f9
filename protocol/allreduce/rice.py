"""The "rice" index codec (issue 17): sorted indices as Golomb-Rice coded gaps, about log2(e / density) bits each.

    payload = encode_rice(indices)             # strictly increasing int64 -> bytes (our own data)
    indices = decode_rice(buf, size, nnz)      # uint8 buffer from a peer -> int64, or ValueError naming the fault
    rice_bytes(indices)                        # len(encode_rice(indices)) without building it

Why: top-k of a pseudo-gradient picks positions that are close to a random subset, so the gaps between them are
close to geometric with mean 1/density, and a Rice code (a geometric distribution's optimal prefix code when its
parameter fits) spends within a few percent of their entropy, log2(e / density) bits: 8.1 bits at 1% against the
LEB128 varint's 10.2 (a varint byte holds 7 bits, so every gap >= 128 costs 2 bytes). With 2-bit values that is
the difference between 256x and ~300x fewer bytes than dense fp32 at 1%. Shared per-round random masks (DeMo,
SparseLoCo's discussion) would cost no index bytes at all but send random entries instead of the largest; the
README's issue-17 figures measure what that does to the loss.

Format (gaps g_0 = i_0, g_j = i_j - i_{j-1} - 1, all >= 0, split as g = q * 2^k + r):
    byte 0           k, the Rice parameter (0..62), chosen by the encoder as the cheapest around log2(mean gap)
    next bytes       every r in k bits, least significant first, packed little-endian bit order (r_0 first);
                     ceil(nnz * k / 8) bytes, unused bits of the last byte zero
    the rest         every q in unary: q zero bits then a one, packed the same way; the last byte holds the last
                     one, and the bits after it are zero
Keeping the remainders and the unary parts in two streams is what lets both sides run vectorised: the decoder finds
every terminator with one flatnonzero. An empty index set is an empty payload.

A receiver checks everything before it trusts a number: k in range, the remainder block's length and padding, exactly
nnz terminators with nothing after the last, every q small enough that q * 2^k stays below its own ``size``, every
index below ``size`` and strictly increasing; its allocations stay within a small multiple of the payload's length.
Pure numpy; no I/O.
"""

from __future__ import annotations

import math

import numpy as np

MAX_K = 62  # every index is < 2^62 (codecs.MAX_SIZE)


def _gaps(indices: np.ndarray) -> np.ndarray:
    """(nnz,) uint64: i_0, then i_j - i_{j-1} - 1."""
    g = np.empty(indices.size, np.uint64)
    if indices.size:
        g[0] = indices[0]
        np.subtract(indices[1:], indices[:-1] + 1, out=g[1:], casting="unsafe")
    return g


def _best_k(g: np.ndarray) -> tuple[int, int]:
    """(k, payload bytes) of the cheapest Rice parameter for gaps ``g`` (nnz >= 1)."""
    mean = float(g.mean())
    guess = max(0, int(math.log2(mean * math.log(2) + 1)))  # the textbook k for a geometric distribution
    best: tuple[int, int] | None = None
    top = int(g.max()).bit_length()  # past it every quotient is already 0
    for k in range(min(max(0, guess - 2), top), min(top, guess + 2) + 1):
        unary_bits = int((g >> np.uint64(k)).sum()) + g.size
        size = 1 + math.ceil(g.size * k / 8) + math.ceil(unary_bits / 8)
        if best is None or size < best[1]:
            best = (k, size)
    assert best is not None
    return best


def rice_bytes(indices: np.ndarray) -> int:
    """Bytes ``encode_rice(indices)`` returns."""
    return _best_k(_gaps(indices))[1] if indices.size else 0


def encode_rice(indices: np.ndarray) -> bytes:
    """Strictly increasing int64 ``indices`` (checked by the caller) as k, remainders, unary quotients."""
    if indices.size == 0:
        return b""
    g = _gaps(indices)
    k, _ = _best_k(g)
    kk = np.uint64(k)
    rem_bits = ((g[:, None] >> np.arange(k, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.uint8)
    rem = np.packbits(rem_bits.reshape(-1), bitorder="little")
    q = (g >> kk).astype(np.int64)
    ends = np.cumsum(q + 1) - 1  # the terminating one of each quotient
    unary = np.zeros(int(ends[-1]) + 1, np.uint8)
    unary[ends] = 1
    return bytes([k]) + rem.tobytes() + np.packbits(unary, bitorder="little").tobytes()


def decode_rice(buf: np.ndarray, size: int, nnz: int) -> np.ndarray:
    """(nnz,) int64 strictly increasing indices < size from a uint8 ``buf``; ValueError on anything invalid."""
    if nnz == 0:
        if buf.size:
            raise ValueError(f"rice payload of {buf.size} bytes for nnz=0 (expected empty)")
        return np.empty(0, np.int64)
    if buf.size < 2:
        raise ValueError(f"rice payload of {buf.size} bytes for nnz={nnz} (at least 2)")
    k = int(buf[0])
    if k > min(MAX_K, max(size - 1, 0).bit_length()):
        raise ValueError(f"rice parameter k={k} does not fit size {size}")
    rem_len = math.ceil(nnz * k / 8)
    unary = buf[1 + rem_len:]
    if unary.size < math.ceil(nnz / 8):
        raise ValueError(f"rice payload of {buf.size} bytes is too short for nnz={nnz} with k={k}")
    rem_bits = np.unpackbits(buf[1:1 + rem_len], bitorder="little")
    if rem_bits[nnz * k:].any():
        raise ValueError("rice remainders: the last byte's unused bits are not zero")
    if unary[-1] == 0:
        raise ValueError("rice quotients: trailing zero byte after the last terminator")
    ones = np.flatnonzero(np.unpackbits(unary, bitorder="little"))  # bounded by 8 x the payload
    if ones.size != nnz:
        raise ValueError(f"rice quotients hold {ones.size} terminators, expected nnz={nnz}")
    # in place from here on (peak ~3 int64 arrays of nnz): q, then g = q * 2^k + r, then the running sum
    g = np.empty(nnz, np.uint64)
    g[0] = ones[0]
    np.subtract(ones[1:], ones[:-1] + 1, out=g[1:], casting="unsafe")  # each >= 0: terminators increase
    del ones
    if int(g.max()) > (size - 1) >> k:
        raise ValueError(f"index out of range: a rice gap reaches past size {size}")
    g <<= np.uint64(k)
    cols = rem_bits[:nnz * k].reshape(nnz, k)
    for j in range(k):
        g |= cols[:, j].astype(np.uint64) << np.uint64(j)
    del rem_bits, cols
    if int(g.max()) >= size:
        raise ValueError(f"index out of range: a gap or first index >= size {size}")
    g[1:] += np.uint64(1)
    np.cumsum(g, out=g)  # each step <= size <= 2^62: a wrap past 2^64 would show as a decrease
    if int(g[-1]) >= size or (nnz > 1 and not bool(np.all(g[1:] > g[:-1]))):
        raise ValueError(f"index out of range: indices reach past size {size}")
    return g.view(np.int64)
