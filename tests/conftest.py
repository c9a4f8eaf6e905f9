"""Fixtures that start real node processes on loopback and always tear them down (no orphaned p2pd)."""

from __future__ import annotations

import gc
import pathlib
import subprocess
import sys

import psutil
import pytest

from node.devtools.localswarm import LocalSwarm, NodeProcess, wait_for

# Short heartbeat/TTL so churn tests finish quickly; a tiny benchmark budget so nodes start fast.
FAST_ARGS = ["--heartbeat", "1", "--ttl", "3", "--benchmark-seconds", "0.05", "--join-attempts", "3", "--join-backoff",
             "0.2"]
REPO = pathlib.Path(__file__).resolve().parents[1]


def p2pd_of_this_test(tmp_path: pathlib.Path) -> list[int]:
    """Live p2pd processes this test started: descendants of the test process, or (once orphaned by a
    killed node) any p2pd whose command line names a file under the test's tmp_path."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if p.info["name"] != "p2pd" or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.pid in mine or any(str(tmp_path) in arg for arg in p.info["cmdline"] or ()):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(autouse=True)
def no_leaked_p2pd(request):
    """Every test must leave no p2pd behind that it started (checked only for tests with a tmp_path)."""
    tmp_path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp_path is not None:
        wait_for(lambda: not p2pd_of_this_test(tmp_path), 10, "p2pd processes started by this test to exit")


@pytest.fixture(autouse=True)
def collect_known_leaks(request):
    """Tests that run hivemind's P2P client in this process mark its unclosed-transport warnings as known
    (filterwarnings ignore PytestUnraisableExceptionWarning): the transports of streams cancelled mid-flight are
    only closed by the garbage collector. Collect them at that test's own teardown, under its own filter, so
    they are never reported against a later test or the end of the session."""
    yield
    if any("PytestUnraisableExceptionWarning" in str(arg) for mark in request.node.iter_markers("filterwarnings")
           for arg in mark.args):
        gc.collect()


CALL_REPORT = pytest.StashKey[pytest.TestReport]()
DAEMON_LOG_LINES = 40  # the last lines of each daemon's log, printed when a test that started it fails


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


def print_daemon_logs(request, nodes) -> None:
    """On failure, the last lines (DEBUG left out) of each daemon's log: CI keeps only pytest's output."""
    report = request.node.stash.get(CALL_REPORT, None)
    if report is None or not report.failed:
        return
    for n in nodes:
        try:
            lines = n.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        shown = [line for line in lines if " [DEBUG] " not in line][-DAEMON_LOG_LINES:]
        print(f"---- {n.home.name} ({n.log_path}): last {len(shown)} lines ----")
        print("\n".join(line[:400] for line in shown))


@pytest.fixture
def swarm_factory(tmp_path, request):
    swarms: list[LocalSwarm] = []

    def make(n: int, swarm: str = "test", extra_args=(), start: bool = True) -> LocalSwarm:
        s = LocalSwarm(tmp_path / f"swarm{len(swarms)}", n, swarm=swarm, extra_args=[*FAST_ARGS, *extra_args])
        swarms.append(s)
        if start:
            s.start()
        return s

    try:
        yield make
    finally:
        print_daemon_logs(request, [n for s in swarms for n in s.nodes])
        for s in swarms:
            s.stop()


@pytest.fixture
def node_factory(tmp_path, request):
    nodes: list[NodeProcess] = []

    def make(name: str, args=(), env=None, fast: bool = True, prefix=()) -> NodeProcess:
        n = NodeProcess(tmp_path / name, [*(FAST_ARGS if fast else []), *args], env=env, prefix=prefix)
        nodes.append(n)
        return n.start()

    try:
        yield make
    finally:
        print_daemon_logs(request, nodes)
        for n in nodes:
            n.stop()


def run_cli(*args: str, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    """Run the real `swarmnode` CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """The same CLI's main(argv) in this process (no interpreter and torch start per call), its exit code and
    output in run_cli's shape: for the many-case error tests; each such test also runs one case through run_cli."""
    import contextlib
    import io

    import node.cli.main as cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["swarmnode", *args], code, out.getvalue(), err.getvalue())
