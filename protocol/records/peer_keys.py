"""Ed25519 keys as libp2p sees them: the node's one key is both its signing key and its libp2p identity.

A libp2p peer id for an Ed25519 key is the *identity* multihash of the protobuf-encoded public key
(https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md), so a peer id carries its public key:
any node can check that a record stored under subkey ``peer_id`` was signed by that peer, with no lookup.
"""

from __future__ import annotations

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# crypto.pb KeyType.Ed25519 = 1; field 1 (varint) = key type, field 2 (bytes) = key data.
_ED25519_KEY_TYPE = 1
_PUBLIC_KEY_PB_PREFIX = bytes([0x08, _ED25519_KEY_TYPE, 0x12, 32])
_PRIVATE_KEY_PB_PREFIX = bytes([0x08, _ED25519_KEY_TYPE, 0x12, 64])
# multihash header: code 0x00 (identity), length 36 (= len(protobuf public key))
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, len(_PUBLIC_KEY_PB_PREFIX) + 32])
PEER_ID_PREFIX = "12D3KooW"  # every Ed25519 peer id in base58 starts with this


class PeerIdError(ValueError):
    """A peer id that is not a well-formed Ed25519 libp2p peer id."""


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def peer_id_bytes(key: Ed25519PublicKey) -> bytes:
    return _IDENTITY_MULTIHASH_PREFIX + _PUBLIC_KEY_PB_PREFIX + raw_public_key(key)


def peer_id_of(key: Ed25519PublicKey) -> str:
    """The base58 libp2p peer id (``12D3KooW...``) of an Ed25519 public key."""
    return base58.b58encode(peer_id_bytes(key)).decode()


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the Ed25519 public key embedded in a peer id; PeerIdError if it is not one."""
    if not isinstance(peer_id, str) or not (40 <= len(peer_id) <= 60):
        raise PeerIdError(f"not an Ed25519 peer id: {peer_id!r:.80}")
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as e:
        raise PeerIdError(f"peer id is not base58: {peer_id!r:.80}") from e
    header = _IDENTITY_MULTIHASH_PREFIX + _PUBLIC_KEY_PB_PREFIX
    if len(raw) != len(header) + 32 or not raw.startswith(header):
        raise PeerIdError(f"not an Ed25519 identity peer id: {peer_id!r:.80}")
    return Ed25519PublicKey.from_public_bytes(raw[len(header) :])


def libp2p_private_key(key: Ed25519PrivateKey) -> bytes:
    """The marshalled libp2p PrivateKey protobuf that p2pd reads with ``-id`` (seed || public key)."""
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return _PRIVATE_KEY_PB_PREFIX + seed + raw_public_key(key.public_key())
