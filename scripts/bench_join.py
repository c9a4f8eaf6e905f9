"""Join latency and idle memory of a swarmnode node, beside a bare hivemind DHT, in one run.

    .venv/bin/python scripts/bench_join.py              # 5 joins, prints a table
    .venv/bin/python scripts/bench_join.py --trials 10

Join latency = wall time from spawning `swarmnode run --join <first node>` (a fresh process: Python
start, imports, identity, p2pd, DHT bootstrap, benchmark, first record) until the first node's
`peers` lists it. The bare-hivemind figure is `hivemind.DHT(initial_peers=[...], start=True)` timed
inside an already-running Python process (no interpreter start or imports), for scale.
Idle memory = RSS of the node's Python process plus its p2pd, 10 s after start.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from node.devtools.localswarm import LocalSwarm, wait_for  # noqa: E402

NODE_ARGS = ["--heartbeat", "10", "--ttl", "30"]  # the defaults, spelled out


def bare_hivemind_join(initial_peer: str, trials: int) -> list[float]:
    code = f"""
import time, hivemind
times = []
for _ in range({trials}):
    t = time.perf_counter()
    dht = hivemind.DHT(initial_peers=[{initial_peer!r}], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    times.append(time.perf_counter() - t)
    dht.shutdown()
print(" ".join(f"{{x:.4f}}" for x in times))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return [float(x) for x in out.stdout.split()]


def rss_mb(pid: int) -> tuple[float, float]:
    proc = psutil.Process(pid)
    children = [c for c in proc.children(recursive=True) if c.name() == "p2pd"]
    return proc.memory_info().rss / 2**20, sum(c.memory_info().rss for c in children) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-join-") as root:
        swarm = LocalSwarm(pathlib.Path(root), 1, swarm="bench", extra_args=NODE_ARGS).start()
        try:
            first = swarm.nodes[0]
            joins = []
            for i in range(args.trials):
                t0 = time.perf_counter()
                node = swarm.add_node()
                node.wait_ready(60)
                wait_for(lambda node=node: node.peer_id in first.peer_ids(), 60, "the joiner in peers", 0.01)
                joins.append(time.perf_counter() - t0)
                if i < args.trials - 1:
                    node.stop()
            time.sleep(10)  # idle: a few heartbeats
            py, p2pd = rss_mb(node.proc.pid)
            bare = bare_hivemind_join(first.addr, args.trials)
        finally:
            swarm.stop()
    print(f"{'measure':<58} {'median':>8} {'min':>8} {'max':>8}")
    print(f"{'swarmnode run --join -> listed in peers (s, incl. process start)':<58} "
          f"{statistics.median(joins):8.2f} {min(joins):8.2f} {max(joins):8.2f}")
    print(f"{'bare hivemind.DHT(initial_peers) in a warm process (s)':<58} "
          f"{statistics.median(bare):8.2f} {min(bare):8.2f} {max(bare):8.2f}")
    print(f"idle node RSS: python {py:.0f} MB + p2pd {p2pd:.0f} MB = {py + p2pd:.0f} MB")


if __name__ == "__main__":
    main()
