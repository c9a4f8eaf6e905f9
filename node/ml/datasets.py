"""Offline datasets and each node's private slice of one: built, partitioned, written and read on the node.

    write_node_data("digits", "node0-data", n_nodes=4, node_index=0, scheme="label-skew", seed=0)
    data = load_node_data("node0-data", dataset="digits")   # manifest + sha256 checked
    for x, y in batches(data, batch_size=32, seed=0): ...    # infinite, deterministic

Datasets (DATASETS), all from files already on the machine; nothing is downloaded:
  - digits, wine, breast_cancer: scikit-learn's bundled copies (sklearn.datasets.load_*), classification.
    digits: 64 pixel values / 16 in [0, 1] (reshape to (1, 8, 8) for a CNN); wine and breast_cancer:
    standardised with the train split's mean and std. Stratified train/test split by seed.
  - pystdlib-bytes: the *.py files of this Python's standard library (sysconfig stdlib path, site-packages
    excluded, sorted relative paths) as bytes, cut per file into windows of block_size + 1 byte tokens for a
    causal LM. The test split is whole files (held out by file, not by window), so eval is honest.

Every node builds the same global dataset and the same global partition from the job's seed, then keeps
only its own slice of the train split; the test split is the same on every node (it is public data) so
evaluations are comparable. This module does local file I/O only: a node's data never leaves it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import sysconfig
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from node.runtime.files import atomic_write

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
SCHEMES = ("iid", "label-skew", "shards")
MANIFEST = "manifest.json"
FORMAT = "swarmnode-node-data/1"

# sklearn.model_selection.train_test_split's default test_size.
TABULAR_TEST_FRACTION = 0.25
# nanoGPT's data/shakespeare_char/prepare.py holds out the last 10% for validation.
TEXT_TEST_FRACTION = 0.1
# Matches node/ml/models.py's gpt2/llama default context (n_positions = 128).
DEFAULT_BLOCK_SIZE = 128
# Dirichlet concentration for label skew: 0.5 is the common heavy-skew setting (Hsu et al. 2019, "Measuring
# the Effects of Non-Identical Data Distribution"; Li et al. 2021 NIID-Bench use 0.5 as their default).
DEFAULT_ALPHA = 0.5
# Each node must hold at least this many items under label skew; draws are repeated until it does
# (NIID-Bench's partition code: min_require_size = 10).
MIN_ITEMS_PER_NODE = 10
MAX_DIRICHLET_DRAWS = 1000
# Shards per node, as McMahan et al. 2017 (FedAvg) pathological non-IID: sorted by label, 2 shards each.
DEFAULT_SHARDS_PER_NODE = 2
# Digit pixels are integers 0..16 (sklearn load_digits DESCR).
DIGITS_MAX = 16.0


FEATURES, TOKENS = "features", "tokens"  # what an item's x holds: float32 features, or uint8 byte tokens
BYTE_VOCAB = 256


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: str
    num_classes: int | None  # None for causal-lm
    feature_shape: tuple[int, ...]  # one item's x: (F,) features, or (block_size + 1,) tokens for text
    source: str
    inputs: str = FEATURES  # FEATURES or TOKENS
    vocab: int | None = None  # token datasets: ids are in [0, vocab)

    def describe(self) -> str:
        what = (f"{self.feature_shape[0] - 1}-token windows" if self.inputs == TOKENS
                else f"{int(np.prod(self.feature_shape))} features per item")
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return f"{self.task}, {what}{classes}"


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", CLASSIFICATION, 10, (64,), "sklearn.datasets.load_digits (1797 8x8 images)"),
    "wine": DatasetInfo("wine", CLASSIFICATION, 3, (13,), "sklearn.datasets.load_wine (178 samples)"),
    "breast_cancer": DatasetInfo("breast_cancer", CLASSIFICATION, 2, (30,),
                                 "sklearn.datasets.load_breast_cancer (569 samples)"),
    "pystdlib-bytes": DatasetInfo("pystdlib-bytes", CAUSAL_LM, None, (DEFAULT_BLOCK_SIZE + 1,),
                                  "this Python's standard library *.py sources as bytes", TOKENS, BYTE_VOCAB),
}


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A whole dataset before partitioning. For text, x holds uint8 windows (N, block_size + 1) and labels
    hold each window's source-file index (what label-skew and shards partition on)."""

    name: str
    task: str
    num_classes: int | None
    x: np.ndarray  # float32 (N, F) or uint8 (N, block_size + 1)
    labels: np.ndarray  # int64 (N,)
    test_x: np.ndarray
    test_labels: np.ndarray
    fingerprint: str  # sha256 of the source data, to tell whether two nodes built the same dataset
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class NodeData:
    """One node's slice of the train split plus the shared test split, as read back from its directory."""

    dataset: str
    task: str
    num_classes: int | None
    x: np.ndarray  # this node's train items
    labels: np.ndarray  # int64 (n,)
    test_x: np.ndarray
    test_labels: np.ndarray
    scheme: str
    n_nodes: int
    node_index: int
    seed: int
    sha256: str  # of the data file
    fingerprint: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.x.shape[0])


class NoLocalData(ValueError):
    """The node has no slice of this dataset (its directory or manifest is missing): `swarmnode data add`."""


class Batch(NamedTuple):
    x: torch.Tensor  # float32 (B, F) features, or int64 (B, T) tokens
    y: torch.Tensor  # int64 (B,) class labels, or int64 (B, T) next tokens


# ---------------------------------------------------------------------------------------------- the datasets

def _check_name(name: str) -> DatasetInfo:
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_int(what: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def load_dataset(name: str, seed: int = 0, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 stdlib_root: str | os.PathLike | None = None) -> DatasetSplits:
    """The whole dataset ``name`` with its train/test split for ``seed`` (same arguments, same arrays)."""
    info = _check_name(name)
    seed = _check_int("seed", seed, 0)
    if info.task == CAUSAL_LM:
        return _byte_corpus(seed, _check_int("block_size", block_size, 1), stdlib_root)
    return _tabular(info, seed)


def _tabular(info: DatasetInfo, seed: int) -> DatasetSplits:
    from sklearn import datasets as skd
    from sklearn.model_selection import train_test_split
    loader = {"digits": skd.load_digits, "wine": skd.load_wine, "breast_cancer": skd.load_breast_cancer}
    raw = loader[info.name]()
    x_all = np.asarray(raw.data, dtype=np.float64)  # (N, F)
    y_all = np.asarray(raw.target, dtype=np.int64)  # (N,)
    fingerprint = hashlib.sha256(x_all.tobytes() + y_all.tobytes()).hexdigest()
    x, test_x, y, test_y = train_test_split(x_all, y_all, test_size=TABULAR_TEST_FRACTION, random_state=seed,
                                            stratify=y_all)
    if info.name == "digits":
        x, test_x = x / DIGITS_MAX, test_x / DIGITS_MAX
    else:  # standardise with train statistics only; constant columns keep scale 1
        mean, std = x.mean(axis=0), x.std(axis=0)
        std[std == 0] = 1.0
        x, test_x = (x - mean) / std, (test_x - mean) / std
    return DatasetSplits(info.name, info.task, info.num_classes, x.astype(np.float32), y,
                         test_x.astype(np.float32), test_y, fingerprint)


def stdlib_sources(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Sorted *.py files under the standard library (or ``root``), skipping site-packages, dist-packages and
    __pycache__; symlinked directories are not followed, so the list is a fixed function of the tree."""
    root = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"no standard-library directory at {root}")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        found += [pathlib.Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _byte_corpus(seed: int, block_size: int, root: str | os.PathLike | None) -> DatasetSplits:
    paths = stdlib_sources(root)
    base = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    n_test = int(np.ceil(len(paths) * TEXT_TEST_FRACTION))
    if len(paths) < 2 or n_test >= len(paths):
        raise ValueError(f"byte corpus under {base} has {len(paths)} .py files; need at least 2")
    test_files = set(np.random.default_rng(seed).permutation(len(paths))[:n_test].tolist())
    width = block_size + 1  # x = window[:-1], y = window[1:]
    parts: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    fingerprint = hashlib.sha256()
    for file_id, path in enumerate(paths):
        data = path.read_bytes()
        fingerprint.update(path.relative_to(base).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
        if len(data) < width:
            continue
        tokens = np.frombuffer(data, dtype=np.uint8)
        n = (len(tokens) - 1) // block_size  # windows at stride block_size overlapping by one byte
        windows = np.lib.stride_tricks.sliding_window_view(tokens, width)[::block_size][:n]  # (n, width)
        xs, ids = parts[file_id in test_files]
        xs.append(windows)
        ids.append(np.full(n, file_id, dtype=np.int64))

    def stack(is_test: bool) -> tuple[np.ndarray, np.ndarray]:
        xs, ids = parts[is_test]
        if not xs:
            raise ValueError(f"byte corpus under {base}: no {'test' if is_test else 'train'} file is longer "
                             f"than block_size + 1 = {width} bytes")
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ids)

    x, labels = stack(False)
    test_x, test_labels = stack(True)
    return DatasetSplits("pystdlib-bytes", CAUSAL_LM, None, x, labels, test_x, test_labels,
                         fingerprint.hexdigest(), {"block_size": block_size, "files": len(paths),
                                                   "test_files": n_test})


# -------------------------------------------------------------------------------------------------- partition

def partition(n_items_or_labels: int | np.ndarray, n_nodes: int, node_index: int, scheme: str = "iid",
              seed: int = 0, *, alpha: float = DEFAULT_ALPHA,
              shards_per_node: int = DEFAULT_SHARDS_PER_NODE) -> np.ndarray:
    """Sorted int64 indices of the items node ``node_index`` of ``n_nodes`` holds. Every node computes the
    same global assignment from ``seed``, so each item lands in exactly one node's slice.

    iid: a seeded permutation cut into near-equal parts. label-skew (needs labels): for each label, its
    items are split among nodes by proportions drawn from Dirichlet(alpha); smaller alpha, stronger skew;
    redrawn until each node has min(MIN_ITEMS_PER_NODE, n // n_nodes) items. shards: items sorted by label
    (by index if only a count is given), cut into n_nodes * shards_per_node shards, dealt at random."""
    if isinstance(n_items_or_labels, (int, np.integer)) and not isinstance(n_items_or_labels, bool):
        labels = None
        n = _check_int("number of items", n_items_or_labels, 0)
    else:
        labels = np.asarray(n_items_or_labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        n = labels.shape[0]
    n_nodes = _check_int("n_nodes", n_nodes, 1)
    node_index = _check_int("node_index", node_index, 0)
    if node_index >= n_nodes:
        raise ValueError(f"node_index {node_index} out of range for {n_nodes} nodes")
    seed = _check_int("seed", seed, 0)
    if n < n_nodes:
        raise ValueError(f"cannot split {n} items among {n_nodes} nodes")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        mine = np.array_split(rng.permutation(n), n_nodes)[node_index]
    elif scheme == "label-skew":
        if labels is None:
            raise ValueError("scheme 'label-skew' needs the labels array, not an item count")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        owner = _dirichlet_owners(labels, n_nodes, float(alpha), rng)
        mine = np.flatnonzero(owner == node_index)
    elif scheme == "shards":
        shards_per_node = _check_int("shards_per_node", shards_per_node, 1)
        n_shards = n_nodes * shards_per_node
        if n < n_shards:
            raise ValueError(f"cannot cut {n} items into {n_shards} shards ({shards_per_node} per node)")
        order = np.arange(n) if labels is None else np.argsort(labels, kind="stable")
        shards = np.array_split(order, n_shards)
        dealt = rng.permutation(n_shards)[node_index * shards_per_node:(node_index + 1) * shards_per_node]
        mine = np.concatenate([shards[s] for s in dealt])
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return np.sort(mine).astype(np.int64)


def _dirichlet_owners(labels: np.ndarray, n_nodes: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """owner[i] = the node item i goes to. Per label: shuffle its items, cut at Dirichlet proportions."""
    n = labels.shape[0]
    need = min(MIN_ITEMS_PER_NODE, n // n_nodes)
    by_label = np.argsort(labels, kind="stable")  # item indices grouped by label
    groups = np.split(by_label, np.flatnonzero(np.diff(labels[by_label])) + 1)
    for _ in range(MAX_DIRICHLET_DRAWS):
        owner = np.empty(n, dtype=np.int64)
        for group in groups:
            idx = rng.permutation(group)
            cuts = (np.cumsum(rng.dirichlet(np.full(n_nodes, alpha)))[:-1] * len(idx)).astype(np.int64)
            for node, part in enumerate(np.split(idx, cuts)):
                owner[part] = node
        if np.bincount(owner, minlength=n_nodes).min() >= need:
            return owner
    raise ValueError(f"label-skew with alpha={alpha} left some of {n_nodes} nodes with fewer than {need} items "
                     f"in {MAX_DIRICHLET_DRAWS} draws; use a larger alpha or fewer nodes")


# ------------------------------------------------------------------------------------------- node directories

def write_node_data(dataset_name: str, out_dir: str | os.PathLike, n_nodes: int, node_index: int,
                    scheme: str = "iid", seed: int = 0, *, alpha: float = DEFAULT_ALPHA,
                    shards_per_node: int = DEFAULT_SHARDS_PER_NODE, block_size: int = DEFAULT_BLOCK_SIZE,
                    stdlib_root: str | os.PathLike | None = None) -> pathlib.Path:
    """Write node ``node_index``'s slice to ``out_dir``: data-<sha>.npz, then manifest.json naming it (both
    written to a temporary file, fsynced and renamed, so a crash leaves the old slice or the new one).
    Returns the manifest path."""
    splits = load_dataset(dataset_name, seed, block_size=block_size, stdlib_root=stdlib_root)
    mine = partition(splits.labels, n_nodes, node_index, scheme, seed, alpha=alpha,
                     shards_per_node=shards_per_node)
    x, labels = splits.x[mine], splits.labels[mine]
    buf = io.BytesIO()
    np.savez(buf, x=x, labels=labels, test_x=splits.test_x, test_labels=splits.test_labels)
    blob = buf.getvalue()
    sha = hashlib.sha256(blob).hexdigest()
    out = pathlib.Path(out_dir)
    data_name = f"data-{sha[:16]}.npz"
    counts: dict[str, Any] = {"train": int(x.shape[0]), "test": int(splits.test_x.shape[0])}
    if splits.task == CLASSIFICATION:
        counts["train_per_label"] = {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    else:
        counts["train_files"] = int(np.unique(labels).size)
    manifest = {
        "format": FORMAT, "dataset": splits.name, "task": splits.task, "num_classes": splits.num_classes,
        "scheme": scheme, "n_nodes": n_nodes, "node_index": node_index, "seed": seed,
        "options": {**splits.options, **({"alpha": alpha} if scheme == "label-skew" else {}),
                    **({"shards_per_node": shards_per_node} if scheme == "shards" else {})},
        "counts": counts, "x_shape": list(x.shape[1:]), "x_dtype": str(x.dtype),
        "fingerprint": splits.fingerprint, "data_file": data_name, "sha256": sha,
    }
    atomic_write(out / data_name, blob)
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    for stale in out.glob("data-*.npz"):  # an earlier slice, no longer named by the manifest
        if stale.name != data_name:
            stale.unlink(missing_ok=True)
    return out / MANIFEST


def load_node_data(path: str | os.PathLike, dataset: str | None = None) -> NodeData:
    """Read and verify a directory written by write_node_data; NoLocalData when the directory or its manifest
    is missing, ValueError (one line) when the manifest is for another dataset than ``dataset`` or the data is
    corrupt."""
    d = pathlib.Path(path)
    if not d.is_dir():
        raise NoLocalData(f"no node data directory at {d}")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise NoLocalData(f"no {MANIFEST} in {d} (`swarmnode data add` writes it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {d / MANIFEST}: {e}") from None
    keys = ("format", "dataset", "task", "num_classes", "scheme", "n_nodes", "node_index", "seed", "counts",
            "fingerprint", "data_file", "sha256")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or any(k not in manifest for k in keys):
        raise ValueError(f"{d / MANIFEST} is not a {FORMAT} manifest")
    if manifest["dataset"] not in DATASETS:
        raise ValueError(f"node data at {d} holds unknown dataset {manifest['dataset']!r}")
    if dataset is not None and manifest["dataset"] != dataset:
        raise ValueError(f"node data at {d} holds dataset {manifest['dataset']!r}, not {dataset!r}")
    data_file = d / str(manifest["data_file"])
    if pathlib.Path(manifest["data_file"]).name != manifest["data_file"]:
        raise ValueError(f"{d / MANIFEST} names a data file outside its directory: {manifest['data_file']!r}")
    try:
        blob = data_file.read_bytes()
    except OSError as e:
        raise ValueError(f"node data file {data_file} is missing or unreadable: {e.strerror}") from None
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ValueError(f"node data file {data_file} is corrupt (sha256 does not match the manifest)")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x", "labels", "test_x", "test_labels")}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"node data file {data_file} is not a valid slice: {e}") from None
    counts = manifest["counts"]
    if (arrays["x"].shape[0] != counts.get("train") or arrays["labels"].shape != (arrays["x"].shape[0],)
            or arrays["test_x"].shape[0] != counts.get("test")
            or arrays["test_labels"].shape != (arrays["test_x"].shape[0],)):
        raise ValueError(f"node data file {data_file} does not match the counts in its manifest")
    return NodeData(manifest["dataset"], manifest["task"], manifest["num_classes"], arrays["x"], arrays["labels"],
                    arrays["test_x"], arrays["test_labels"], manifest["scheme"], manifest["n_nodes"],
                    manifest["node_index"], manifest["seed"], manifest["sha256"], manifest["fingerprint"],
                    manifest.get("options", {}))


def list_node_data(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One entry per dataset directory under ``data_dir`` (sorted by name), each verified by load_node_data:
    name, dataset, task, train/test items, item shape and dtype, classes, the slice (I of N, scheme, seed), and
    ``error`` ("" when the slice is whole). A missing ``data_dir`` lists nothing."""
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry: dict[str, Any] = {"name": d.name, "path": str(d), "error": ""}
        try:
            data = load_node_data(d)
        except ValueError as e:
            entry["error"] = str(e)
        else:
            entry.update({"dataset": data.dataset, "task": data.task, "train": data.n_train,
                          "test": int(data.test_x.shape[0]), "item_shape": list(data.x.shape[1:]),
                          "dtype": str(data.x.dtype), "classes": data.num_classes,
                          "slice": f"{data.node_index}/{data.n_nodes}", "scheme": data.scheme, "seed": data.seed})
            if data.dataset != d.name:
                entry["error"] = f"holds dataset {data.dataset!r}; a job finds it only under {data.dataset}/"
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------------- batches

def _to_batch(task: str, x: np.ndarray, labels: np.ndarray) -> Batch:
    if task == CAUSAL_LM:
        w = torch.from_numpy(x).long()  # (B, T + 1)
        return Batch(w[:, :-1], w[:, 1:])  # (B, T), (B, T)
    return Batch(torch.from_numpy(x), torch.from_numpy(labels).long())  # float32 (B, F), int64 (B,)


def batches(node_data: NodeData, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless minibatches of this node's train slice: epoch after epoch, each a fresh seeded permutation;
    every batch has exactly ``batch_size`` items (a batch may span two epochs)."""
    batch_size = _check_int("batch_size", batch_size, 1)
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    n = node_data.n_train
    if n == 0:
        raise ValueError(f"node data for {node_data.dataset!r} has no train items")
    order, pos = rng.permutation(n), 0
    while True:
        idx = np.empty(batch_size, dtype=np.int64)
        filled = 0
        while filled < batch_size:
            if pos == n:
                order, pos = rng.permutation(n), 0
            take = min(batch_size - filled, n - pos)
            idx[filled:filled + take] = order[pos:pos + take]
            filled, pos = filled + take, pos + take
        yield _to_batch(node_data.task, node_data.x[idx], node_data.labels[idx])


def eval_batches(node_data: NodeData, batch_size: int, max_items: int | None = None) -> Iterator[Batch]:
    """The test split in order, once; with ``max_items``, that many items evenly spaced over it (so a text
    eval samples every part of the held-out files). The same on every node."""
    batch_size = _check_int("batch_size", batch_size, 1)
    total = node_data.test_x.shape[0]
    if max_items is None or _check_int("max_items", max_items, 1) >= total:
        idx = np.arange(total)
    else:
        idx = np.linspace(0, total - 1, max_items).round().astype(np.int64)  # distinct since max_items < total
    for start in range(0, idx.size, batch_size):
        chunk = idx[start:start + batch_size]
        yield _to_batch(node_data.task, node_data.test_x[chunk], node_data.test_labels[chunk])


__all__ = ["Batch", "DATASETS", "DatasetInfo", "DatasetSplits", "NoLocalData", "NodeData", "SCHEMES", "batches",
           "eval_batches", "list_node_data", "load_dataset", "load_node_data", "partition", "stdlib_sources",
           "write_node_data"]
