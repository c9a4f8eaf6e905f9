"""requirements.lock: exact pins only, covering every dependency pyproject.toml names within its range, and
the environment the tests run in holds exactly the lock (what `make` installs); scripts/lock_drift.py."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import lock_drift  # noqa: E402

LOCK = REPO / "requirements.lock"
LATEST = os.environ.get("SWARMNODE_TEST_LATEST") == "1"  # `make test-latest`: newer versions on purpose


def pins() -> dict[str, str]:
    return lock_drift.read_lock(LOCK)


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_line_of_the_lock_is_an_exact_pin():
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), line


def test_the_lock_covers_pyproject_within_its_ranges():
    """A dependency added to or narrowed in pyproject.toml without `make lock` fails here."""
    locked = pins()
    for req in declared():
        name = lock_drift.normal(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        version = locked[name].split("+")[0]  # torch's +cpu local label: the CPU build of that release
        assert req.specifier.contains(version, prereleases=True), \
            f"requirements.lock pins {name}=={locked[name]} outside pyproject.toml's {req}: run `make lock`"


def test_the_lock_pins_current_transformers_and_the_cpu_torch():
    locked = pins()
    assert locked["torch"] == "2.13.0+cpu"
    major, minor = map(int, locked["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 24)


@pytest.mark.skipif(LATEST, reason="make test-latest runs newer versions than the lock on purpose")
def test_this_environment_is_exactly_the_lock():
    have = {lock_drift.normal(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert lock_drift.drift(pins(), have) == [], "the venv differs from requirements.lock: rebuild it with make"


def test_drift_names_what_differs(tmp_path):
    lock = tmp_path / "r.lock"
    lock.write_text("# via pip-compile\nFoo_Bar==1.0\n    # via x\nbaz==2.0\nqux==3.0 ; python_version >= '3'\n")
    assert lock_drift.read_lock(lock) == {"foo-bar": "1.0", "baz": "2.0", "qux": "3.0"}
    lines = lock_drift.drift(lock_drift.read_lock(lock), {"foo-bar": "1.1", "baz": "2.0", "new": "0.1",
                                                          "swarmnode": "0.1.0"})
    assert lines == ["  ~ foo-bar 1.0 -> 1.1", "  + new 0.1 (not in the lock)", "  - qux 3.0 (locked, not installed)"]
    bad = tmp_path / "bad.lock"
    bad.write_text("foo>=1\n")
    with pytest.raises(SystemExit, match="not an exact pin"):
        lock_drift.read_lock(bad)
