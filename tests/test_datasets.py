"""node/ml/datasets.py: offline datasets, partitions that cover every item once, node directories that are
verified on load, deterministic minibatches, and a byte corpus whose test split is held out by file."""

from __future__ import annotations

import json
import pathlib
import socket

import numpy as np
import pytest
import torch

from node.ml.datasets import (
    DATASETS,
    SCHEMES,
    batches,
    eval_batches,
    load_dataset,
    load_node_data,
    partition,
    stdlib_sources,
    write_node_data,
)
from node.ml.models import build_model


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dataset code tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def corpus():
    return load_dataset("pystdlib-bytes", seed=0)


@pytest.fixture
def tiny_tree(tmp_path) -> pathlib.Path:
    """A fake standard library: three packages, a short file, and a site-packages that must be skipped."""
    root = tmp_path / "lib"
    for i in range(12):
        f = root / f"pkg{i % 3}" / f"mod{i}.py"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes((f"# module {i}\n" + f"def f{i}(x):\n    return x * {i}\n" * (5 + i)).encode())
    (root / "short.py").write_bytes(b"x = 1\n")
    (root / "site-packages" / "thirdparty.py").parent.mkdir()
    (root / "site-packages" / "thirdparty.py").write_bytes(b"import os\n" * 100)
    (root / "notes.txt").write_bytes(b"not python\n" * 100)
    return root


def tv_from_global(labels: np.ndarray, part: np.ndarray, k: int) -> float:
    """Total-variation distance between a node's label distribution and the whole train split's."""
    p = np.bincount(labels[part], minlength=k) / len(part)
    q = np.bincount(labels, minlength=k) / len(labels)
    return 0.5 * float(np.abs(p - q).sum())


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "pystdlib-bytes"])
def test_tabular_datasets_load_offline_split_stratified(name, no_network):
    s = load_dataset(name, seed=0)
    info = DATASETS[name]
    assert s.x.dtype == s.test_x.dtype == np.float32 and s.x.shape[1:] == info.feature_shape
    assert s.labels.dtype == np.int64 and set(np.unique(s.labels)) == set(range(info.num_classes))
    total = len(s.labels) + len(s.test_labels)
    assert len(s.test_labels) == pytest.approx(0.25 * total, abs=1)
    train_frac = np.bincount(s.labels) / len(s.labels)
    test_frac = np.bincount(s.test_labels) / len(s.test_labels)
    assert np.abs(train_frac - test_frac).max() < 0.02  # stratified
    if name == "digits":
        assert s.x.min() >= 0.0 and s.x.max() <= 1.0
    else:
        np.testing.assert_allclose(s.x.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(s.x.std(axis=0), 1.0, atol=1e-4)
    again, other = load_dataset(name, seed=0), load_dataset(name, seed=1)
    np.testing.assert_array_equal(again.x, s.x)
    assert not np.array_equal(other.labels, s.labels) and other.fingerprint == s.fingerprint


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        write_node_data("mnist", "/nonexistent", 2, 0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_nodes", [1, 3, 4, 7])
def test_partition_covers_every_item_exactly_once(scheme, n_nodes, digits):
    parts = [partition(digits.labels, n_nodes, i, scheme, seed=5) for i in range(n_nodes)]
    allocated = np.concatenate(parts)
    assert len(allocated) == len(digits.labels)
    np.testing.assert_array_equal(np.sort(allocated), np.arange(len(digits.labels)))
    assert all(len(p) > 0 and p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = [partition(digits.labels, n_nodes, i, scheme, seed=5) for i in range(n_nodes)]
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if scheme != "label-skew":  # a bare item count works too
        counted = np.concatenate([partition(100, n_nodes, i, scheme, seed=5) for i in range(n_nodes)])
        np.testing.assert_array_equal(np.sort(counted), np.arange(100))


def test_label_skew_is_skewed_and_iid_is_not(digits):
    labels, k = digits.labels, 10

    def mean_tv(scheme, **kw):
        return np.mean([tv_from_global(labels, partition(labels, 4, i, scheme, 0, **kw), k) for i in range(4)])

    iid, skew, mild, shards = mean_tv("iid"), mean_tv("label-skew", alpha=0.1), mean_tv("label-skew", alpha=100.0), \
        mean_tv("shards")
    assert iid < 0.06
    assert skew > 0.4 and shards > 0.4
    assert mild < skew  # larger alpha, closer to iid
    for i in range(4):  # shards: 2 shards of sorted labels span at most 2 * 2 labels
        assert len(np.unique(labels[partition(labels, 4, i, "shards", 0)])) <= 4
    assert partition(labels, 4, 0, "iid", 0).tolist() != partition(labels, 4, 0, "iid", 1).tolist()


@pytest.mark.parametrize("args, fragment", [
    ((100, 4, 4, "iid", 0), "node_index 4 out of range"),
    ((100, 0, 0, "iid", 0), "n_nodes must be an integer >= 1"),
    ((100, 4, 0, "dirichlet", 0), "unknown partition scheme 'dirichlet'"),
    ((100, 4, 0, "label-skew", 0), "needs the labels array"),
    ((3, 4, 0, "iid", 0), "cannot split 3 items among 4 nodes"),
    ((7, 4, 0, "shards", 0), "cannot cut 7 items into 8 shards"),
    ((np.zeros(10), 2, 0, "iid", 0), "1-D integer array"),
    ((100, 2, 0, "iid", -1), "seed must be"),
])
def test_partition_rejects_bad_arguments(args, fragment):
    with pytest.raises(ValueError) as e:
        partition(*args)
    assert fragment in str(e.value)


def test_label_skew_rejects_bad_alpha(digits):
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        partition(digits.labels, 4, 0, "label-skew", 0, alpha=0)


def test_write_load_round_trip(tmp_path, digits, no_network):
    parts = []
    for i in range(3):
        d = tmp_path / f"node{i}"
        manifest = write_node_data("digits", d, 3, i, scheme="label-skew", seed=0, alpha=0.3)
        data = load_node_data(d, dataset="digits")
        mine = partition(digits.labels, 3, i, "label-skew", 0, alpha=0.3)
        np.testing.assert_array_equal(data.x, digits.x[mine])
        np.testing.assert_array_equal(data.labels, digits.labels[mine])
        np.testing.assert_array_equal(data.test_x, digits.test_x)  # every node holds the same test split
        assert (data.dataset, data.task, data.num_classes, data.scheme, data.n_nodes, data.node_index) == \
            ("digits", "classification", 10, "label-skew", 3, i)
        meta = json.loads(manifest.read_text())
        assert meta["counts"]["train"] == data.n_train and meta["options"] == {"alpha": 0.3}
        assert sum(meta["counts"]["train_per_label"].values()) == data.n_train
        assert sorted(p.name for p in d.iterdir()) == sorted([meta["data_file"], "manifest.json"])  # no temp files
        parts.append(data.n_train)
    assert sum(parts) == len(digits.labels)
    # rewriting the same directory with another slice replaces the data file, leaving no stale one
    write_node_data("digits", tmp_path / "node0", 3, 1, scheme="iid", seed=0)
    assert len(list((tmp_path / "node0").glob("data-*.npz"))) == 1
    assert load_node_data(tmp_path / "node0").node_index == 1


def one_line_error(path, dataset=None) -> str:
    with pytest.raises(ValueError) as e:
        load_node_data(path, dataset=dataset)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_wrong_and_corrupt_node_data_rejected(tmp_path):
    d = tmp_path / "node"
    assert "no node data directory" in one_line_error(tmp_path / "absent")
    d.mkdir()
    assert "no manifest.json" in one_line_error(d)
    write_node_data("wine", d, 2, 0, seed=0)
    assert "holds dataset 'wine', not 'digits'" in one_line_error(d, "digits")
    meta = json.loads((d / "manifest.json").read_text())
    data_file = d / meta["data_file"]
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data_file.write_bytes(bytes(blob))
    assert "corrupt" in one_line_error(d, "wine")
    data_file.unlink()
    assert "missing or unreadable" in one_line_error(d)
    (d / "manifest.json").write_text("{not json")
    assert "unreadable" in one_line_error(d)
    (d / "manifest.json").write_text(json.dumps({**meta, "data_file": "../elsewhere.npz"}))
    assert "outside its directory" in one_line_error(d)
    (d / "manifest.json").write_text(json.dumps({"format": "something else"}))
    assert "is not a swarmnode-node-data/1 manifest" in one_line_error(d)


def test_batches_deterministic_shapes_and_epochs(tmp_path):
    write_node_data("digits", tmp_path, 4, 2, scheme="iid", seed=0)
    data = load_node_data(tmp_path)
    first = [b for _, b in zip(range(5), batches(data, 16, seed=3))]
    again = [b for _, b in zip(range(5), batches(data, 16, seed=3))]
    other = next(batches(data, 16, seed=4))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(first, again))
    assert not torch.equal(first[0].x, other.x)
    x, y = first[0]
    assert x.shape == (16, 64) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    # one epoch's worth of items shows every item exactly once
    n = data.n_train
    seen = torch.cat([b.x for _, b in zip(range(n), batches(data, 1, seed=0))])
    assert torch.equal(torch.sort(seen.sum(1)).values, torch.sort(torch.from_numpy(data.x).sum(1)).values)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(data, 0, seed=0))
    evals = list(eval_batches(data, 100))
    assert sum(len(b.y) for b in evals) == len(data.test_labels)
    assert sum(len(b.y) for b in eval_batches(data, 7, max_items=30)) == 30


def test_digits_mlp_learns_from_one_nodes_slice(tmp_path):
    """The two modules fit together: a few hundred SGD steps on a quarter of digits beat 80% test accuracy."""
    write_node_data("digits", tmp_path, 4, 0, scheme="iid", seed=0)
    data = load_node_data(tmp_path, dataset="digits")
    bundle = build_model("mlp", {"inputs": 64}, seed=0, num_classes=data.num_classes)
    opt = torch.optim.Adam(bundle.module.parameters(), lr=3e-3)
    for _, batch in zip(range(300), batches(data, 32, seed=0)):
        opt.zero_grad()
        bundle.loss(bundle.module, batch).backward()
        opt.step()
    assert bundle.evaluate(bundle.module, eval_batches(data, 128))["accuracy"] > 0.8


def test_byte_corpus_is_deterministic_and_test_split_disjoint_by_file(corpus, no_network):
    again = load_dataset("pystdlib-bytes", seed=0)
    assert again.fingerprint == corpus.fingerprint
    np.testing.assert_array_equal(again.x, corpus.x)
    np.testing.assert_array_equal(again.test_labels, corpus.test_labels)
    assert corpus.x.dtype == np.uint8 and corpus.x.shape[1] == 129 and corpus.test_x.shape[1] == 129
    train_files, test_files = set(corpus.labels.tolist()), set(corpus.test_labels.tolist())
    assert not train_files & test_files and len(test_files) > 10
    assert corpus.options["test_files"] == int(np.ceil(corpus.options["files"] * 0.1))
    other = load_dataset("pystdlib-bytes", seed=1)
    assert set(other.test_labels.tolist()) != test_files and other.fingerprint == corpus.fingerprint
    # non-IID text slices: shards by source file give each node whole files
    parts = [partition(corpus.labels, 4, i, "shards", 0) for i in range(4)]
    assert sum(len(p) for p in parts) == len(corpus.labels)


def test_byte_windows_reproduce_the_files(tiny_tree):
    paths = stdlib_sources(tiny_tree)
    names = [p.relative_to(tiny_tree).as_posix() for p in paths]
    assert names == sorted(names) and "site-packages/thirdparty.py" not in names and "notes.txt" not in names
    s = load_dataset("pystdlib-bytes", seed=0, block_size=16, stdlib_root=tiny_tree)
    assert s.x.shape[1] == 17 and not set(s.labels.tolist()) & set(s.test_labels.tolist())
    short = names.index("short.py")
    assert short not in set(s.labels.tolist()) | set(s.test_labels.tolist())  # shorter than one window
    for file_id in sorted(set(s.labels.tolist()))[:3]:
        data = paths[file_id].read_bytes()
        windows = s.x[s.labels == file_id]
        stream = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])  # windows overlap by one byte
        assert stream.tobytes() == data[:len(stream)] and len(data) - len(stream) < 16


def test_text_node_data_and_batches_shift_by_one(tmp_path, tiny_tree):
    write_node_data("pystdlib-bytes", tmp_path / "n", 2, 1, scheme="shards", seed=0, block_size=16,
                    stdlib_root=tiny_tree, shards_per_node=1)
    data = load_node_data(tmp_path / "n", dataset="pystdlib-bytes")
    assert data.task == "causal-lm" and data.num_classes is None and data.options["block_size"] == 16
    x, y = next(batches(data, 4, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    lm = build_model("gpt2", {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16}, seed=0)
    metrics = lm.evaluate(lm.module, eval_batches(data, 8))
    assert metrics["bits_per_byte"] > 0
    with pytest.raises(ValueError, match="block_size"):
        load_dataset("pystdlib-bytes", block_size=0, stdlib_root=tiny_tree)
