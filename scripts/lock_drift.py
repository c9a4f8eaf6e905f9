"""Which installed packages differ from the lock: run with the Python of the environment to compare.

    .venv-latest/bin/python scripts/lock_drift.py requirements.lock    # what `make test-latest` prints
    .venv/bin/python scripts/lock_drift.py requirements.lock           # nothing differs: the locked venv

Prints one line per package whose installed version is not the locked one, and the packages present on one
side only (the project itself is left out); exit status 0 either way (drift is information, the test run
that follows is the verdict). Names are compared in PEP 503 normal form ("Foo_bar" == "foo-bar").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import re
import sys

PROJECT = "swarmnode"


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: pathlib.Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line (pip-compile's format: comments, '# via' lines)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: not an exact pin: {line!r}")
        pins[normal(name.strip())] = version.strip().split(";")[0].strip()
    return pins


def installed() -> dict[str, str]:
    return {normal(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def drift(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(locked) | set(have)):
        if name == PROJECT:
            continue
        old, new = locked.get(name), have.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"  + {name} {new} (not in the lock)")
        elif new is None:
            lines.append(f"  - {name} {old} (locked, not installed)")
        else:
            lines.append(f"  ~ {name} {old} -> {new}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lock", type=pathlib.Path)
    args = parser.parse_args(argv)
    lines = drift(read_lock(args.lock), installed())
    where = sys.prefix
    if lines:
        print(f"{len(lines)} package(s) in {where} differ from {args.lock}:")
        print("\n".join(lines))
    else:
        print(f"every package in {where} is at its version in {args.lock}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
