"""A private swarm's keys and certificates on disk: the owner's key, certificate files, this node's certificate.

    owner_id, created = create_owner(home, "lab")              # <home>/owners/lab.key (0600), kept by the owner
    cert = invite(home, "lab", peer_id, days=365)               # signed by the owner key (certificates.py)
    write_cert_file(path, cert); cert = read_cert_file(path)   # JSON, for people to hand around
    cert = node_certificate(config, peer_id)                    # what `swarmnode run` uses: None in an open swarm

A certificate file is JSON (swarm, owner, member, expires_at, signature in hex); the member's node keeps its
own at <home>/swarm.cert (``swarmnode swarm join-cert FILE`` checks and copies it there) or wherever the config
key ``swarm_cert`` says. A node runs in its swarm as a private member when it holds a certificate for that swarm
name; its certificate names the owner, whose signature it then requires of every peer's.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import re
import time

from node.runtime.config import NodeConfig
from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from node.runtime.identity import load_or_create_key
from protocol.records.certificates import CertError, MembershipCert, check_cert, issue_cert
from protocol.records.peer_keys import PeerIdError, peer_id_of, public_key_from_peer_id

logger = logging.getLogger(__name__)
FILE_KIND = "swarmnode membership certificate"
MAX_FILE_BYTES = 4096
SWARM_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # as NodeConfig checks --swarm
DAY_S = 86400.0


def owner_key_path(home: pathlib.Path, swarm: str) -> pathlib.Path:
    if not SWARM_NAME.fullmatch(swarm):
        raise NodeError(f"swarm name must be 1-64 characters of [A-Za-z0-9._-], got {swarm!r:.80}", EXIT_USAGE)
    return home / "owners" / f"{swarm}.key"


def create_owner(home: pathlib.Path, swarm: str) -> tuple[str, bool]:
    """(owner id, created): the owner key of private swarm ``swarm`` in ``home``, made if it is not there."""
    key, created = load_or_create_key(owner_key_path(home, swarm))
    return peer_id_of(key.public_key()), created


def invite(home: pathlib.Path, swarm: str, member: str, days: float, now: float | None = None) -> MembershipCert:
    """The owner's certificate admitting ``member`` to ``swarm`` for ``days``; NodeError (exit 2) if this home
    owns no such swarm or the peer id is not one."""
    path = owner_key_path(home, swarm)
    if not path.exists():
        raise NodeError(f"this home ({home}) owns no private swarm {swarm!r}: run `swarmnode swarm create {swarm}` "
                        "there first", EXIT_USAGE)
    if not (0 < days <= 36500):
        raise NodeError(f"--days must be in (0, 36500], got {days}", EXIT_USAGE)
    try:
        public_key_from_peer_id(member)
    except PeerIdError as e:
        raise NodeError(f"PEER_ID: {e}", EXIT_USAGE) from None
    key, _ = load_or_create_key(path)
    return issue_cert(key, swarm, member, (time.time() if now is None else now) + days * DAY_S)


def cert_to_json(cert: MembershipCert) -> dict:
    return {"kind": FILE_KIND, "swarm": cert.swarm, "owner": cert.owner, "member": cert.member,
            "expires_at": cert.expires_at, "expires": cert.expires, "signature": cert.signature.hex()}


def write_cert_file(path: pathlib.Path, cert: MembershipCert) -> None:
    atomic_write(path, (json.dumps(cert_to_json(cert), indent=2) + "\n").encode(), mode=0o600)


def read_cert_file(path: pathlib.Path) -> MembershipCert:
    """The certificate in a file; NodeError (exit 2) naming the file if it cannot be read or is not one."""
    try:
        with open(path.expanduser(), "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise NodeError(f"certificate file {path} does not exist", EXIT_USAGE) from None
    except OSError as e:
        raise NodeError(f"certificate file {path}: cannot read it ({e.strerror or e})", EXIT_USAGE) from None
    try:
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict) or obj.get("kind") != FILE_KIND:
            raise ValueError(f"not a {FILE_KIND}")
        signature = bytes.fromhex(obj["signature"]) if isinstance(obj.get("signature"), str) else b""
        return MembershipCert(obj.get("swarm", ""), obj.get("owner", ""), obj.get("member", ""),
                              obj.get("expires_at", math.nan), signature)
    except (ValueError, UnicodeDecodeError) as e:  # CertError and json's errors are ValueErrors
        raise NodeError(f"certificate file {path}: {e}", EXIT_USAGE) from None


def check_own(cert: MembershipCert, peer_id: str, where: str) -> MembershipCert:
    """``cert`` if it admits ``peer_id`` now (to its swarm, under its owner); else NodeError (exit 2) saying why."""
    try:
        check_cert(cert, cert.swarm, cert.owner, peer_id, time.time())
    except CertError as e:
        raise NodeError(f"{where}: {e}", EXIT_USAGE) from None
    return cert


def node_certificate(config: NodeConfig, peer_id: str) -> MembershipCert | None:
    """This node's certificate of its swarm (``swarm_cert``, else <home>/swarm.cert), checked: None when it holds
    none for its swarm (an open swarm); NodeError (exit 2) when it is unusable."""
    path = config.swarm_cert_path
    if not path.exists():
        if config.swarm_cert is not None:
            raise NodeError(f"swarm_cert: {path} does not exist", EXIT_USAGE)
        return None
    cert = read_cert_file(path)
    if cert.swarm != config.swarm:
        if config.swarm_cert is not None:
            raise NodeError(f"swarm_cert: {path} is a certificate of swarm {cert.swarm!r}, and this node runs "
                            f"--swarm {config.swarm}", EXIT_USAGE)
        logger.warning("%s is a certificate of private swarm %r; this node runs in the open swarm %r", path,
                       cert.swarm, config.swarm)
        return None
    check_own(cert, peer_id, str(path))
    if cert.expires_at - time.time() < 7 * DAY_S:
        logger.warning("this node's certificate of swarm %r expires at %s: ask its owner for a new one", cert.swarm,
                       cert.expires)
    return cert
