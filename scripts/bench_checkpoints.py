"""What a federated job's per-round checkpoint costs (node/jobs/federated/checkpoints.py; issue 14, bullet 7).

    .venv/bin/python scripts/bench_checkpoints.py                    # the demo model and 10M parameters
    .venv/bin/python scripts/bench_checkpoints.py --repeats 20 --dir /var/tmp

For each model size, with and without outer momentum (FedAvg keeps none; DiLoCo's Nesterov keeps a vector the size of
the model), the median of --repeats rounds of:
  * on the loop: what federated_jobs.py does on the event loop after a round -- JobRunner.snapshot()'s copies of
    the parameters (and momentum), which are all it does there before handing the state to the writer;
  * write: CheckpointStore.write in a worker thread, as CheckpointWriter runs it: sha256 of every file, each file
    written to a temporary file, fsynced and renamed, the folder fsynced, the manifest last, then pruning (KEEP=3);
  * loop lag: the longest the event loop went without running a 1 ms ticker while that write ran in its thread
    (asyncio.to_thread), i.e. how much the write holds the GIL away from the loop;
  * load: CheckpointStore.load_latest, verifying every sha256 and the model hash (once per restart).
Parameters: a standard normal float32 vector (seed 0); the round history holds 30 entries of the demo's shape.
The demo model is examples/demo.toml's (an MLP on digits). --dir picks the file system (default: a fresh temporary
folder under the system's temporary directory, which may be tmpfs: then fsync is free; pass a disk folder).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from node.jobs.federated.checkpoints import Checkpoint, CheckpointStore  # noqa: E402
from node.jobs.spec import job_spec_from_text  # noqa: E402
from node.ml.job_model import build_job_model  # noqa: E402
from node.ml.models import flatten_params  # noqa: E402
from protocol.records.job_records import JobRecord  # noqa: E402
from protocol.transfer.job_state import params_hash  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PEER = "12D3KooWGRUVh6PUKz8sxZJ2ywm1Mw3gcd3ThmWUW6ZySHvGcgNW"  # any valid peer id: the record's submitter


async def write_with_lag(store: CheckpointStore, ckpt: Checkpoint) -> tuple[float, float]:
    """(seconds the write took in its thread, the longest gap between ticks of a 1 ms loop ticker meanwhile)."""
    lag, done = [0.0], asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            lag[0] = max(lag[0], now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    await asyncio.to_thread(store.write, ckpt)
    seconds = time.perf_counter() - t0
    done.set()
    await tick
    return seconds, lag[0]


def bench(name: str, size: int, momentum: bool, record: JobRecord, history: list[dict], root: pathlib.Path,
          repeats: int) -> dict:
    rng = np.random.default_rng(0)
    params = rng.standard_normal(size).astype(np.float32)  # (size,) float32, the global model
    velocity = rng.standard_normal(size).astype(np.float32) if momentum else None
    model_hash = params_hash(params)
    store = CheckpointStore(root / record.job_id)
    copies, writes, lags = [], [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        p, m = params.copy(), None if velocity is None else velocity.copy()  # JobRunner.snapshot()
        copies.append(time.perf_counter() - t0)
        ckpt = Checkpoint(record.job_id, r + 1, r + 1, model_hash, p, m, (PEER,), history, record)
        seconds, lag = asyncio.run(write_with_lag(store, ckpt))
        writes.append(seconds)
        lags.append(lag)
    t0 = time.perf_counter()
    assert store.load_latest(size) is not None
    load = time.perf_counter() - t0
    on_disk = sum(f.stat().st_size for f in store.folders()[-1].iterdir())
    return {"model": name, "params": size, "momentum": momentum, "MB": on_disk / 1e6,
            "loop_ms": 1e3 * statistics.median(copies), "write_ms": 1e3 * statistics.median(writes),
            "write_max_ms": 1e3 * max(writes), "lag_ms": 1e3 * statistics.median(lags), "load_ms": 1e3 * load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--big", type=int, default=10_000_000, help="parameters of the large vector")
    ap.add_argument("--dir", type=pathlib.Path, default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    spec = job_spec_from_text((REPO / "examples" / "demo.toml").read_text(), "examples/demo.toml")
    demo_size = flatten_params(build_job_model(spec).module).size
    record = JobRecord.create(spec, PEER, "bench", time.time())
    history = [{"round": r, "ok": True, "error": None, "participants": [PEER] * 4, "train_loss": 0.5, "samples": 640,
                "metrics": {"accuracy": 0.9}, "bytes_sent": 5000, "bytes_received": 5000, "seconds": 1.0,
                "local_seconds": 0.5, "model_hash": "0" * 64, "paused": False, "reported_by": PEER}
               for r in range(30)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = pathlib.Path(tmp)
        rows = [bench(name, size, momentum, record, history, root / f"{name}-{momentum}", args.repeats)
                for name, size in (("demo MLP", demo_size), (f"{args.big / 1e6:g}M vector", args.big))
                for momentum in (False, True)]
    print(f"checkpoint cost, median of {args.repeats} writes ({args.dir or tempfile.gettempdir()})")
    print(f"{'model':<14}{'params':>12}{'momentum':>10}{'on disk MB':>12}{'on loop ms':>12}{'write ms':>10}"
          f"{'(max)':>8}{'loop lag ms':>13}{'load ms':>9}")
    for r in rows:
        print(f"{r['model']:<14}{r['params']:>12,}{'yes' if r['momentum'] else 'no':>10}{r['MB']:>12.2f}"
              f"{r['loop_ms']:>12.2f}{r['write_ms']:>10.1f}{r['write_max_ms']:>8.1f}{r['lag_ms']:>13.2f}"
              f"{r['load_ms']:>9.1f}")


if __name__ == "__main__":
    main()
