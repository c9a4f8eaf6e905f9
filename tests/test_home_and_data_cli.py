"""The node's home and data directories from the CLI: every unusable home (a regular file, under /proc,
unreadable, on a full disk) and a missing --data are one line and exit 2, before any daemon starts; and
`swarmnode data add / list` gives a node its own slice of a bundled dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_in_process, run_cli
from tests.test_bad_input import assert_one_line_error

IS_ROOT = os.geteuid() == 0


def run_without_root_file_access(*args: str) -> subprocess.CompletedProcess:
    """The CLI as root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: file permissions apply to it."""
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                           "node.cli", *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_a_home_that_is_a_regular_file(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory")
    assert_one_line_error(run_cli("run", "--home", str(home)), 2, f"home {home} is not a directory")
    assert_one_line_error(run_cli("status", "--home", str(home)), 2, f"home {home} is not a directory")
    assert_one_line_error(run_cli("jobs", "--home", str(home)), 2, "is not a directory")
    assert home.read_text() == "not a directory"  # nothing lost


def test_a_home_under_proc():
    assert_one_line_error(run_cli("run", "--home", "/proc/swarmnode-home"), 2, "/proc/swarmnode-home",
                          "virtual file system")


@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"), reason="needs root and setpriv to drop file access")
def test_an_unreadable_home(tmp_path):
    home = tmp_path / "locked"
    home.mkdir(mode=0o000)
    try:
        assert_one_line_error(run_without_root_file_access("status", "--home", str(home)), 2, "cannot be read",
                              "permission denied")
        assert_one_line_error(run_without_root_file_access("run", "--home", str(home)), 2, "cannot be written",
                              "permission denied")
    finally:
        home.chmod(0o700)


@pytest.mark.skipif(not IS_ROOT or not shutil.which("mount"), reason="needs root to mount a small tmpfs")
def test_a_home_on_a_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        with open(disk / "fill", "wb", buffering=0) as f:  # fill it to the last block
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError:
                pass
        assert_one_line_error(run_cli("run", "--home", str(disk / "home")), 2, "no space left on the device")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_data_directory_that_does_not_exist(tmp_path):
    assert_one_line_error(run_cli("run", "--home", str(tmp_path / "h"), "--data", str(tmp_path / "nope")), 2,
                          f"data directory {tmp_path / 'nope'} does not exist", "swarmnode data add")


def test_data_add_and_list(tmp_path):
    home = tmp_path / "h"
    empty = json.loads(run_cli("data", "list", "--json", "--home", str(home)).stdout)
    assert empty == []
    added = run_cli("data", "add", "wine", "--slice", "1/3", "--scheme", "label-skew", "--home", str(home))
    assert added.returncode == 0, added.stderr
    assert "wrote slice 1/3 (label-skew) of wine" in added.stdout and str(home / "data" / "wine") in added.stdout
    assert cli_in_process("data", "add", "digits", "--home", str(home)).returncode == 0  # the whole train split
    listed = {e["name"]: e for e in json.loads(cli_in_process("data", "list", "--json", "--home", str(home)).stdout)}
    assert sorted(listed) == ["digits", "wine"]
    assert listed["digits"]["slice"] == "0/1" and listed["digits"]["train"] == 1347 and listed["digits"]["test"] == 450
    assert listed["wine"]["item_shape"] == [13] and listed["wine"]["classes"] == 3 and not listed["wine"]["error"]
    table = cli_in_process("data", "list", "--home", str(home)).stdout
    assert "wine" in table and "1/3" in table and f"2 dataset(s) in {home / 'data'}" in table
    # a damaged slice is listed as unusable, with the reason
    data_file = next((home / "data" / "wine").glob("data-*.npz"))
    data_file.write_bytes(data_file.read_bytes()[:-10])
    listed = {e["name"]: e for e in json.loads(cli_in_process("data", "list", "--json", "--home", str(home)).stdout)}
    assert "corrupt" in listed["wine"]["error"]
    # an explicit --data directory is used as given (the same flag `run --data` takes)
    other = tmp_path / "elsewhere"
    assert cli_in_process("data", "add", "breast_cancer", "--data", str(other), "--home", str(home)).returncode == 0
    assert (other / "breast_cancer" / "manifest.json").is_file()


@pytest.mark.parametrize("args,needle", [
    (["digitz"], "unknown dataset 'digitz'; bundled: digits"),
    (["digits", "--slice", "4/4"], "expected I/N with 0 <= I < N"),
    (["digits", "--slice", "half"], "expected I/N"),
    (["digits", "--seed", "-1"], "--seed must be >= 0"),
    (["digits", "--slice", "0/2000"], "cannot split"),
])
def test_bad_data_add_arguments(tmp_path, args, needle):
    assert_one_line_error(cli_in_process("data", "add", *args, "--home", str(tmp_path / "h")), 2, needle)
    assert not (tmp_path / "h" / "data" / "digits").exists()


def test_data_add_into_a_home_that_is_a_file(tmp_path):
    home = tmp_path / "h"
    home.write_text("x")
    assert_one_line_error(run_cli("data", "add", "digits", "--home", str(home)), 2, "cannot write to data directory")
