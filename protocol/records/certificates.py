"""Membership certificates of a private swarm: the owner's Ed25519 signature over (swarm, member peer id, expiry).

    cert = issue_cert(owner_key, "lab", member_peer_id, expires_at=time.time() + 365 * 86400)
    check_cert(cert, "lab", owner_id, member=peer_id, now=time.time())   # CertError (a ValueError) naming why not
    cert = cert_from_wire(cert_to_wire(cert))                             # a bounded msgpack map

The owner is an Ed25519 key of its own (``swarmnode swarm create`` keeps it in the owner's home), named as a
libp2p-style peer id (12D3KooW...: it embeds the public key, protocol/records/peer_keys.py), so that a
certificate carries everything needed to check it except the swarm's identity: a member takes the swarm's
name and owner from its own certificate and accepts a peer's only if both match. What the owner signs is
``pack([CERT_DOMAIN, swarm, owner, member, expires_at])``: the domain string keeps the signature from being
valid as anything else the key might sign. A private swarm's DHT records carry their writer's certificate
(protocol/records/membership_validation.py); no revocation beyond expiry.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.records.peer_keys import PeerIdError, peer_id_of, public_key_from_peer_id
from protocol.records.values import short
from protocol.wire import WireError, exact_map, field, pack, text, unpack_bounded

CERT_DOMAIN = "swarmnode/membership-certificate/v1"
MAX_CERT_BYTES = 512  # swarm (<= 64) + two peer ids (~52) + expiry + a 64-byte signature, as msgpack: ~260 bytes
SIGNATURE_BYTES = 64
WIRE_FIELDS = ("swarm", "owner", "member", "expires_at", "sig")


class CertError(ValueError):
    """A membership certificate that does not admit its holder (one line naming why)."""


@dataclass(frozen=True)
class MembershipCert:
    swarm: str  # the private swarm's name (its DHT namespace, --swarm)
    owner: str  # the owner's Ed25519 public key, as a peer id
    member: str  # the member's peer id
    expires_at: float  # unix time after which the certificate admits nobody
    signature: bytes  # the owner's Ed25519 signature over cert_payload(...)

    def __post_init__(self) -> None:
        for name in ("swarm", "owner", "member"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value) <= 64:
                raise CertError(f"certificate {name}: expected 1-64 characters, got {value!r:.40}")
        for name in ("owner", "member"):
            try:
                public_key_from_peer_id(getattr(self, name))
            except PeerIdError as e:
                raise CertError(f"certificate {name}: {e}") from None
        if isinstance(self.expires_at, bool) or not isinstance(self.expires_at, (int, float)) or \
                not math.isfinite(self.expires_at):
            raise CertError(f"certificate expires_at: expected a finite unix time, got {self.expires_at!r:.40}")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise CertError(f"certificate signature: expected {SIGNATURE_BYTES} bytes")

    @property
    def expires(self) -> str:
        """The expiry as an ISO 8601 UTC time (for people)."""
        return datetime.datetime.fromtimestamp(self.expires_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cert_payload(swarm: str, owner: str, member: str, expires_at: float) -> bytes:
    """The bytes the owner signs."""
    return pack([CERT_DOMAIN, swarm, owner, member, float(expires_at)])


def issue_cert(owner_key: Ed25519PrivateKey, swarm: str, member: str, expires_at: float) -> MembershipCert:
    """The owner's certificate admitting ``member`` to ``swarm`` until ``expires_at``; CertError for a bad field."""
    owner = peer_id_of(owner_key.public_key())
    MembershipCert(swarm, owner, member, float(expires_at), bytes(SIGNATURE_BYTES))  # the fields' checks first
    return MembershipCert(swarm, owner, member, float(expires_at),
                          owner_key.sign(cert_payload(swarm, owner, member, expires_at)))


def check_cert(cert: MembershipCert, swarm: str, owner: str, member: str | None = None, now: float = 0.0) -> None:
    """CertError unless ``cert`` admits ``member`` (any member if None) to ``swarm`` of ``owner`` at time ``now``:
    the same swarm and owner, the same member, the owner's signature, not expired."""
    if cert.swarm != swarm:
        raise CertError(f"the certificate is for swarm {cert.swarm!r}, not {swarm!r}")
    if cert.owner != owner:
        raise CertError(f"the certificate is signed by owner {short(cert.owner)}, not this swarm's {short(owner)}")
    if member is not None and cert.member != member:
        raise CertError(f"the certificate is for peer {short(cert.member)}, not {short(member)}")
    try:
        public_key_from_peer_id(cert.owner).verify(cert.signature,
                                                   cert_payload(cert.swarm, cert.owner, cert.member, cert.expires_at))
    except InvalidSignature:
        raise CertError(f"bad owner signature on the certificate of {short(cert.member)}") from None
    if cert.expires_at <= now:
        raise CertError(f"the certificate of {short(cert.member)} expired at {cert.expires}")


# ---- wire form --------------------------------------------------------------------------


def cert_to_wire(cert: MembershipCert) -> bytes:
    return pack({"swarm": cert.swarm, "owner": cert.owner, "member": cert.member, "expires_at": cert.expires_at,
                 "sig": cert.signature})


def cert_from_wire(data: bytes) -> MembershipCert:
    """A certificate from a peer's bytes; WireError (a ValueError) if they are not one."""
    obj = exact_map(unpack_bounded(data, MAX_CERT_BYTES), WIRE_FIELDS, "certificate")
    expires = field(obj, "expires_at", (int, float), "certificate")
    try:
        return MembershipCert(text(obj, "swarm", "certificate", 64), text(obj, "owner", "certificate", 64),
                              text(obj, "member", "certificate", 64), float(expires),
                              field(obj, "sig", bytes, "certificate"))
    except CertError as e:
        raise WireError(str(e)) from None
