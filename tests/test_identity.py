"""node/runtime/identity.py (key file, p2pd identity, home lock) and node/runtime/files.py (atomic_write)."""

from __future__ import annotations

import os
import random
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.runtime.errors import EXIT_USAGE, NodeError
from node.runtime.files import atomic_write
from node.runtime.identity import HomeLock, load_or_create_key, write_p2p_identity
from protocol.records.peer_keys import libp2p_private_key


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def seeded_key(seed: int = 0) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(random.Random(seed).randbytes(32))


def assert_usage_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    assert excinfo.value.exit_code == EXIT_USAGE
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ---- load_or_create_key --------------------------------------------------------------------------------


def test_creates_key_with_private_modes(tmp_path):
    path = tmp_path / "home" / "identity.key"
    key, created = load_or_create_key(path)
    assert created is True
    assert isinstance(key, Ed25519PrivateKey)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temporary file left


def test_second_call_loads_the_same_key(tmp_path):
    path = tmp_path / "home" / "identity.key"
    first, created_first = load_or_create_key(path)
    second, created_second = load_or_create_key(path)
    assert (created_first, created_second) == (True, False)
    assert raw(first) == raw(second)


def test_loads_an_existing_key(tmp_path):
    path = tmp_path / "identity.key"
    atomic_write(path, pem(seeded_key(7)), mode=0o600)
    key, created = load_or_create_key(path)
    assert created is False
    assert raw(key) == raw(seeded_key(7))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_readable_by_others_refused(tmp_path, mode):
    path = tmp_path / "identity.key"
    load_or_create_key(path)
    os.chmod(path, mode)
    with pytest.raises(NodeError) as excinfo:
        load_or_create_key(path)
    assert_usage_error(excinfo, "chmod 600", str(path), f"{mode:04o}")


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                                     bytes(random.Random(3).randbytes(64))], ids=["empty", "text", "bad-pem", "binary"])
def test_corrupt_key_refused(tmp_path, content):
    path = tmp_path / "identity.key"
    atomic_write(path, content, mode=0o600)
    with pytest.raises(NodeError) as excinfo:
        load_or_create_key(path)
    assert_usage_error(excinfo, "corrupt", str(path))


def test_rsa_key_refused(tmp_path):
    path = tmp_path / "identity.key"
    atomic_write(path, pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), mode=0o600)
    with pytest.raises(NodeError) as excinfo:
        load_or_create_key(path)
    assert_usage_error(excinfo, "not an Ed25519 key", "RSA")


def test_ec_key_refused(tmp_path):
    path = tmp_path / "identity.key"
    atomic_write(path, pem(ec.generate_private_key(ec.SECP256R1())), mode=0o600)
    with pytest.raises(NodeError) as excinfo:
        load_or_create_key(path)
    assert_usage_error(excinfo, "not an Ed25519 key")


def test_encrypted_key_refused(tmp_path):
    path = tmp_path / "identity.key"
    encrypted = seeded_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    atomic_write(path, encrypted, mode=0o600)
    with pytest.raises(NodeError) as excinfo:
        load_or_create_key(path)
    assert excinfo.value.exit_code == EXIT_USAGE


def test_directory_in_place_of_key_refused(tmp_path):
    path = tmp_path / "identity.key"
    path.mkdir()
    with pytest.raises(NodeError) as excinfo:
        load_or_create_key(path)
    assert_usage_error(excinfo, "not a regular file")


# ---- write_p2p_identity --------------------------------------------------------------------------------


def test_write_p2p_identity(tmp_path):
    key = seeded_key(1)
    path = tmp_path / "p2p" / "identity.p2p"
    write_p2p_identity(key, path)
    assert mode_of(path) == 0o600
    assert path.read_bytes() == libp2p_private_key(key)
    assert len(path.read_bytes()) == 68


def test_write_p2p_identity_rewrites(tmp_path):
    path = tmp_path / "identity.p2p"
    write_p2p_identity(seeded_key(1), path)
    os.chmod(path, 0o644)
    write_p2p_identity(seeded_key(2), path)
    assert path.read_bytes() == libp2p_private_key(seeded_key(2))
    assert mode_of(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["identity.p2p"]


# ---- HomeLock ------------------------------------------------------------------------------------------


def test_home_lock_excludes_a_second_daemon(tmp_path):
    home = tmp_path / "home"
    first, second = HomeLock(home), HomeLock(home)
    try:
        first.acquire()
        assert first.held and not second.held
        assert (home / "node.lock").read_text() == str(os.getpid())
        with pytest.raises(NodeError) as excinfo:
            second.acquire()
        assert_usage_error(excinfo, f"pid {os.getpid()}", str(home))
        assert not second.held
    finally:
        first.release()
        second.release()


def test_home_lock_release_allows_reacquire(tmp_path):
    first, second = HomeLock(tmp_path), HomeLock(tmp_path)
    try:
        first.acquire()
        first.release()
        assert not first.held
        second.acquire()
        assert second.held
        second.release()
        first.acquire()  # and back again
        assert first.held
    finally:
        first.release()
        second.release()


def test_home_lock_release_is_idempotent(tmp_path):
    lock = HomeLock(tmp_path)
    lock.release()
    lock.acquire()
    lock.release()
    lock.release()
    assert not lock.held


def test_home_locks_are_per_home(tmp_path):
    a, b = HomeLock(tmp_path / "a"), HomeLock(tmp_path / "b")
    try:
        a.acquire()
        b.acquire()
        assert a.held and b.held
    finally:
        a.release()
        b.release()


def test_home_lock_file_is_private(tmp_path):
    lock = HomeLock(tmp_path / "home")
    try:
        lock.acquire()
        assert mode_of(lock.path) & 0o077 == 0
    finally:
        lock.release()


# ---- atomic_write --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_atomic_write_sets_mode_and_leaves_no_temp_file(tmp_path, mode):
    path = tmp_path / "state.json"
    atomic_write(path, b'{"a": 1}', mode=mode)
    assert path.read_bytes() == b'{"a": 1}'
    assert mode_of(path) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_replaces_existing_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old contents, longer than the new ones")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o600  # the default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "file.bin"
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
