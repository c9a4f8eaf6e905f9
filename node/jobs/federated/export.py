"""What a finished (or running) job leaves on disk: the model as safetensors, its manifest, a JSON report of
every round, and a PNG of the loss and metric curves.

A round's report entry is the dict form of node/jobs/federated/runner.py RoundResult. A node that joined mid-job, or a
node that never took part and only exports, gets the rounds before its own from the participant it downloaded
the state from (``merge_history``), so every report covers the whole job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pathlib
from collections.abc import Callable, Iterable

import torch
from safetensors.torch import save

from node.jobs.federated.runner import RoundResult
from node.runtime.files import atomic_write
from protocol.records.job_records import JobRecord
from protocol.transfer.job_state import MAX_HISTORY_BYTES

FILES = ("model.safetensors", "report.json", "curve.png", "manifest.json")  # manifest last: then all are there


def remove_torn_writes(folder: pathlib.Path) -> list[pathlib.Path]:
    """Delete the temporary files (node/runtime/files.py atomic_write: ``.NAME.XXXX.tmp``) that a write
    interrupted by SIGKILL or a power cut left in ``folder``; return them."""
    torn = sorted(folder.rglob(".*.tmp")) if folder.is_dir() else []
    for path in torn:
        path.unlink(missing_ok=True)
    return torn


def round_entry(result: RoundResult, reporter: str) -> dict:
    return {**dataclasses.asdict(result), "reported_by": reporter}


def merge_history(own: Iterable[dict], received: Iterable[dict]) -> list[dict]:
    """One entry per round id, sorted by round id: an applied round over a failed attempt of the same id,
    then this node's own entry over a received one. A failed attempt of this node's that another node's
    applied entry replaces stays visible in that entry as ``this_node_error``."""
    by_round: dict[int, dict] = {}
    own = list(own)
    for entry in [*own, *received]:
        if not isinstance(entry, dict) or not isinstance(entry.get("round"), int):
            continue
        kept = by_round.get(entry["round"])
        if kept is None:
            by_round[entry["round"]] = entry
        elif entry.get("ok") and not kept.get("ok"):
            by_round[entry["round"]] = {**entry, "this_node_error": kept.get("error")} if kept in own else entry
    return [by_round[r] for r in sorted(by_round)]


def history_to_json(history: list[dict]) -> bytes:
    """JSON bytes of the history within MAX_HISTORY_BYTES (the oldest rounds are dropped beyond it)."""
    blob = json.dumps(history, default=str, allow_nan=True).encode()
    while len(blob) > MAX_HISTORY_BYTES and history:
        history = history[len(history) // 4 + 1:]
        blob = json.dumps(history, default=str, allow_nan=True).encode()
    return blob


def history_from_json(blob: bytes) -> list[dict]:
    """A peer's history; ValueError if it is not a JSON list of round entries."""
    try:
        items = json.loads(blob)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int beyond 4300 digits
        raise ValueError(f"round history is not JSON: {str(e).partition(': value has')[0]}") from None
    except RecursionError:  # json.loads recurses once per level of nesting
        raise ValueError("round history is not JSON: nested too deeply") from None
    if not isinstance(items, list) or not all(isinstance(e, dict) and isinstance(e.get("round"), int) for e in items):
        raise ValueError("round history is not a list of round entries")
    return items


def curve_png(history: list[dict], metric: str, title: str) -> bytes:
    """Train loss and the eval metric per round, as PNG bytes (matplotlib's Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in history if e.get("ok")]
    losses = [(e["round"], e["train_loss"]) for e in ok if isinstance(e.get("train_loss"), float)
              and math.isfinite(e["train_loss"])]
    evaluated = [(e["round"], e["metrics"][metric]) for e in ok if metric in (e.get("metrics") or {})]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot([r for r, _ in losses], [v for _, v in losses], color="tab:blue")
    left.set(xlabel="round id", ylabel="mean local train loss (reporting node)")
    right.plot([r for r, _ in evaluated], [v for _, v in evaluated], color="tab:orange")
    right.set(xlabel="round id", ylabel=f"test {metric}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def export_job(out: pathlib.Path, record: JobRecord, module: torch.nn.Module | dict[str, torch.Tensor],
               model_hash: str, rounds: int,
               own_rounds: int, history: list[dict], metric: str,
               model_files: dict[str, bytes] | None = None,
               before_write: Callable[[str], None] | None = None) -> list[pathlib.Path]:
    """Write FILES under ``out`` (each atomically: temporary file, fsync, rename; manifest.json last, so a
    reader that sees it finds the others, and a folder without it is an interrupted export, which the node
    redoes: node/jobs/federated/federated_jobs.py redo_export); return their paths. The ``.tmp`` files an
    interrupted write left in ``out`` are removed first; ``before_write`` (fault injection for tests) is called
    with each name before its write. ``model_files`` (relative name -> bytes: a model
    folder job's adapter in peft's format, or its model folder; node/ml/hf_models.py export_files) take the
    place of model.safetensors, and the manifest's tensors are the trained ones. ``module`` may be the named
    tensors themselves (a script run's parameters: node/jobs/federated/script_runs.py)."""
    # clone: tied weights (GPT-2's lm_head / wte) share storage, which safetensors refuses; each name gets
    # its own copy, and load_state_dict puts them back into the one shared parameter
    if isinstance(module, dict):
        tensors = module
        model_files = {"model.safetensors": save(tensors)}
    elif model_files is None:
        tensors = {name: t.detach().clone().contiguous() for name, t in module.state_dict().items()}
        model_files = {"model.safetensors": save(tensors)}
    else:
        tensors = {n: p.detach().cpu().clone().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    manifest = {
        "job_id": record.job_id, "name": record.spec.name, "model_hash": model_hash,
        "rounds": rounds,  # rounds of the job this model has been through
        "rounds_this_node": own_rounds,  # of those, rounds the exporting node took part in
        **({"file_sha256": hashlib.sha256(model_files["model.safetensors"]).hexdigest()}
           if list(model_files) == ["model.safetensors"] else
           {"files_sha256": {n: hashlib.sha256(b).hexdigest() for n, b in model_files.items()}}),
        "tensors": {n: hashlib.sha256(t.numpy().tobytes()).hexdigest() for n, t in tensors.items()},
        "spec": dataclasses.asdict(record.spec),
    }
    contents = {
        **model_files,
        "manifest.json": json.dumps(manifest, indent=1).encode(),
        "report.json": json.dumps(history, indent=1, default=str).encode(),
        "curve.png": curve_png(history, metric, record.spec.name),
    }
    names = [*model_files, *(n for n in FILES if n != "model.safetensors")]  # manifest.json last
    remove_torn_writes(out)
    for name in names:
        if before_write is not None:
            before_write(name)
        atomic_write(out / name, contents[name])
    return [out / name for name in names]


@dataclasses.dataclass
class Rounds:
    """What this node keeps of one job's rounds: its own, and the earlier ones of the peer whose state it
    adopted (so that its report covers the whole job)."""

    own: list[RoundResult] = dataclasses.field(default_factory=list)
    inherited: list[dict] = dataclasses.field(default_factory=list)

    def report(self, reporter: str) -> list[dict]:
        return merge_history([round_entry(r, reporter) for r in reversed(self.own)], self.inherited)
