"""A node's own data: files it names under a dataset name, read in place, checked against what a job declares.

    entry = add_source(data_dir, "churn", "/srv/churn.csv", "csv", label="churned")   # `swarmnode data add`
    sources = list_sources(data_dir, config_sources)       # name, format, rows, schema and its hash
    data = load_for_job(source, spec.data, seed)            # NodeData, or DataMismatch naming what differs

Formats: csv, parquet and jsonl through pyarrow (a file, or a folder of such files read in name order); text (a
folder, one document per file, or csv/parquet/jsonl with ``--text-field``); imagefolder (one subfolder per class,
images read with Pillow). ``swarmnode data add`` records where the data is and what it holds in
``<data>/<NAME>/source.json``; nothing is copied, and nothing of it leaves the node: a job sees only whether this
node's data matches its declaration (protocol/records/job_inputs.py DataSpec) and, if it takes part, the model
updates computed from it. The node's TOML config can name the same sources (``[datasets.NAME]`` tables with
path, format, label, text_field), bound in the data directory when the daemon starts.

Each job reads the data anew: the train/test split is a seeded permutation of this node's items (text: of its
documents, so held-out text is whole documents), so every round evaluates on data the node never trains on.
Features are used as given (scale them before adding; each node's own statistics would give every node a
different model input).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.ml.datasets import CAUSAL_LM, CLASSIFICATION, NodeData
from node.runtime.files import atomic_write
from protocol.records.job_inputs import DataSpec

FORMATS = ("csv", "parquet", "jsonl", "text", "imagefolder")
TABLE_FORMATS = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SOURCE_FILE = "source.json"
SOURCE_FORMAT = "swarmnode-local-source/1"
TEST_FRACTION = 0.2  # of items (tabular, images) or documents (text) held out for evaluation
MAX_SOURCE_FILES = 1_000_000
NUMERIC_PREFIXES = ("int", "uint", "float", "double", "halffloat", "bool", "decimal")

Tokenizer = Callable[[str], list[int]]


class DataMismatch(ValueError):
    """This node's data does not hold what the job declares; the message is the reason the node declines."""


@dataclass(frozen=True)
class LocalSource:
    """A dataset name bound to this node's files: where they are, in which format, which column is the label or
    the text. ``origin`` says where the binding was made (the data directory or the config file)."""

    name: str
    path: pathlib.Path
    format: str
    label: str = ""
    text_field: str = ""
    origin: str = ""
    stats: Mapping[str, Any] = field(default_factory=dict)  # rows, schema, schema_sha256 as last inspected

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not self.name or len(self.name) > 64 or not all(c.isalnum() or c in "._-" for c in self.name):
            raise ValueError(f"dataset name must be 1-64 characters of [A-Za-z0-9._-], got {self.name!r}")
        if self.format in ("text", "imagefolder") and self.label:
            raise ValueError(f"--label: a {self.format} source has no label column "
                             f"({'its subfolders are the classes' if self.format == 'imagefolder' else 'use jsonl'})")
        if self.format == "imagefolder" and self.text_field:
            raise ValueError("--text-field: an image folder has no text")


# ---------------------------------------------------------------------------------------------------- reading

def _files(path: pathlib.Path, suffix: str | None) -> list[pathlib.Path]:
    """``path`` itself, or the non-hidden files under it (with ``suffix``) in sorted relative-path order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"no file or folder at {path}")
    found = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [pathlib.Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and (suffix is None or f.lower().endswith(suffix))]
        if len(found) > MAX_SOURCE_FILES:
            raise ValueError(f"{path} holds more than {MAX_SOURCE_FILES} files")
    if not found:
        raise ValueError(f"{path} holds no {suffix or ''} files".replace("  ", " "))
    return found


def read_table(path: pathlib.Path, fmt: str):
    """A pyarrow Table of every ``fmt`` file at ``path`` (one file, or a folder of them concatenated)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    readers = {"csv": pcsv.read_csv, "parquet": pq.read_table, "jsonl": pjson.read_json}
    tables = []
    for f in _files(path, TABLE_FORMATS[fmt] if path.is_dir() else None):
        try:
            tables.append(readers[fmt](str(f)))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ValueError(f"{f}: not readable as {fmt}: {str(e).splitlines()[0][:200]}") from None
    try:
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except pa.ArrowException as e:
        raise ValueError(f"{path}: its {fmt} files have different columns: {str(e).splitlines()[0][:200]}") from None


def _documents(source: LocalSource) -> tuple[list[str], list[str] | None]:
    """(documents, their labels or None) of a text source."""
    if source.format == "text":
        docs = []
        for f in _files(source.path, None):
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{f} is not UTF-8 text") from None
        return docs, None
    table = read_table(source.path, source.format)
    text_field = source.text_field or "text"
    if text_field not in table.column_names:
        raise DataMismatch(f"this node's {source.name!r} has no text field {text_field!r} "
                           f"(columns: {', '.join(table.column_names[:20])})")
    docs = [d if isinstance(d, str) else "" for d in table.column(text_field).to_pylist()]
    labels = None
    if source.label:
        if source.label not in table.column_names:
            raise DataMismatch(f"this node's {source.name!r} has no label column {source.label!r}")
        labels = [label_text(v) for v in table.column(source.label).to_pylist()]
    return docs, labels


def _image_classes(path: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    if not path.is_dir():
        raise ValueError(f"an image folder is a folder of class subfolders; {path} is not a folder")
    classes = {}
    for d in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in _files(d, None) if f.suffix.lower() in IMAGE_SUFFIXES] if any(d.iterdir()) else []
        classes[d.name] = files
    if not classes:
        raise ValueError(f"{path} has no class subfolders (an image folder holds one subfolder per class)")
    return classes


def label_text(value: Any) -> str:
    """A label value as the job's ``classes`` name it: integers (and integral floats) as digits, text as is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------- inspecting a source

def inspect_source(source: LocalSource) -> dict[str, Any]:
    """What ``data list`` shows: rows (items or documents), the schema (column -> type) and its sha256."""
    if source.format in TABLE_FORMATS:
        table = read_table(source.path, source.format)
        schema = {f.name: str(f.type) for f in table.schema}
        for name, what in ((source.label, "label"), (source.text_field, "text field")):
            if name and name not in schema:
                raise ValueError(f"{source.path} has no {what} column {name!r} (columns: "
                                 f"{', '.join(list(schema)[:20])})")
        rows, extra = table.num_rows, dict[str, Any]()
        if source.label:
            values = table.column(source.label).to_pylist()
            extra["labels"] = dict(sorted(_counts(label_text(v) for v in values).items())[:64])
    elif source.format == "text":
        files = _files(source.path, None)
        schema, rows = {"text": "string (one document per file)"}, len(files)
        extra = {"bytes": sum(f.stat().st_size for f in files)}
    else:
        classes = _image_classes(source.path)
        schema, rows = {"image": "image file", "label": "class subfolder"}, sum(map(len, classes.values()))
        extra = {"labels": {k: len(v) for k, v in classes.items()}}
    digest = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
    return {"rows": rows, "schema": schema, "schema_sha256": digest, **extra}


def _counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def add_source(data_dir: str | os.PathLike, name: str, path: str | os.PathLike, fmt: str, *, label: str = "",
               text_field: str = "", origin: str = "") -> dict[str, Any]:
    """Bind ``name`` to the files at ``path`` (checked by reading them): writes <data_dir>/<name>/source.json
    (``origin``: "config" for a binding the node's config made)."""
    source = LocalSource(name, pathlib.Path(path).expanduser().resolve(), fmt, label, text_field)
    stats = inspect_source(source)
    entry = {"format": SOURCE_FORMAT, "name": name, "path": str(source.path), "source_format": fmt, "label": label,
             "text_field": text_field, **stats, **({"origin": origin} if origin else {})}
    out = pathlib.Path(data_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", *(p.name for p in out.glob("data-*.npz"))):  # a bundled slice it replaces
        (out / stale).unlink(missing_ok=True)
    atomic_write(out / SOURCE_FILE, (json.dumps(entry, indent=2, sort_keys=True) + "\n").encode())
    return entry


def source_from_entry(entry: Mapping[str, Any], origin: str) -> LocalSource:
    try:
        return LocalSource(str(entry["name"]), pathlib.Path(str(entry["path"])).expanduser(),
                           str(entry.get("source_format", entry.get("format", ""))), str(entry.get("label", "")),
                           str(entry.get("text_field", "")), origin, dict(entry))
    except KeyError as e:
        raise ValueError(f"{origin}: missing {e.args[0]!r}") from None


def config_sources(tables: Mapping[str, Any], origin: str = "config") -> dict[str, LocalSource]:
    """The ``[datasets.NAME]`` tables of the node's config (path, format, label, text_field)."""
    out = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"{origin}: datasets.{name} must be a table (path, format, label, text_field)")
        unknown = sorted(set(table) - {"path", "format", "label", "text_field"})
        if unknown:
            raise ValueError(f"{origin}: datasets.{name}.{unknown[0]}: unknown key (known: path, format, label, "
                             f"text_field)")
        if "path" not in table or "format" not in table:
            raise ValueError(f"{origin}: datasets.{name} needs path and format")
        out[name] = source_from_entry({**table, "name": name, "source_format": table["format"]}, origin)
    return out


def sync_config_sources(data_dir: str | os.PathLike, tables: Mapping[str, Any], origin: str = "config") -> list[str]:
    """Bind the config's ``[datasets.NAME]`` sources in the data directory (a source.json each, marked as the
    config's; checked by reading the files), and drop the config's earlier bindings it no longer names. Returns
    the names bound."""
    root = pathlib.Path(data_dir)
    sources = config_sources(tables, origin)
    for stale in root.glob(f"*/{SOURCE_FILE}"):
        try:
            was_config = json.loads(stale.read_text()).get("origin") == origin
        except (OSError, ValueError, AttributeError):
            continue
        if was_config and stale.parent.name not in sources:
            stale.unlink(missing_ok=True)
    for name, source in sources.items():
        add_source(root, name, source.path, source.format, label=source.label, text_field=source.text_field,
                   origin=origin)
    return sorted(sources)


def find_source(data_dir: str | os.PathLike, name: str,
                configured: Mapping[str, LocalSource] | None = None) -> LocalSource | None:
    """The source bound to ``name``: the config's, else <data_dir>/<name>/source.json; None if neither."""
    if configured and name in configured:
        return configured[name]
    path = pathlib.Path(data_dir) / name / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {path}: {e}") from None
    if not isinstance(entry, dict) or entry.get("format") != SOURCE_FORMAT:
        raise ValueError(f"{path} is not a {SOURCE_FORMAT} file")
    return source_from_entry(entry, str(path))


def list_sources(data_dir: str | os.PathLike, configured: Mapping[str, LocalSource] | None = None) -> list[dict]:
    """One entry per own-data source (data directory and config), re-inspected: name, format, path, rows,
    schema, schema_sha256, origin and ``error`` ("" when readable)."""
    root = pathlib.Path(data_dir)
    names = sorted({*(configured or {}), *(p.parent.name for p in root.glob(f"*/{SOURCE_FILE}"))})
    out = []
    for name in names:
        entry: dict[str, Any] = {"name": name, "error": ""}
        try:
            source = find_source(root, name, configured)
            assert source is not None
            entry.update({"format": source.format, "path": str(source.path), "origin": source.origin,
                          "label": source.label, "text_field": source.text_field})
            entry.update(inspect_source(source))
        except (ValueError, OSError) as e:
            entry["error"] = str(e)
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------ reading it for a job

def _split(n: int, seed: int, what: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays: a seeded permutation, TEST_FRACTION (at least one) held out."""
    if n < 2:
        raise DataMismatch(f"this node's {name!r} has {n} {what}; it needs at least 2 (one to train, one to test)")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * TEST_FRACTION)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _class_ids(labels: list[str], classes: tuple[str, ...], name: str, column: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({v for v in labels if v not in index})
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise DataMismatch(f"this node's {name!r} {column} holds {shown}, not among the job's classes "
                           f"({', '.join(map(repr, classes[:8]))}{' ...' if len(classes) > 8 else ''})")
    return np.array([index[v] for v in labels], dtype=np.int64)


def _tabular(source: LocalSource, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.compute as pc

    if source.format not in TABLE_FORMATS:
        raise DataMismatch(f"this node's {source.name!r} is {source.format}; the job declares a table")
    table = read_table(source.path, source.format)
    columns = set(table.column_names)
    missing = [c for c in (*spec.features, spec.label) if c not in columns]
    if missing:
        raise DataMismatch(f"this node's {source.name!r} has no column {missing[0]!r} (it has "
                           f"{', '.join(table.column_names[:12])}{' ...' if len(columns) > 12 else ''})")
    xs = []
    for name in spec.features:
        col = table.column(name)
        if not str(col.type).startswith(NUMERIC_PREFIXES):
            raise DataMismatch(f"this node's {source.name!r} column {name!r} is {col.type}, the job needs numbers")
        if col.null_count:
            raise DataMismatch(f"this node's {source.name!r} column {name!r} has {col.null_count} missing values")
        values = pc.cast(col, "float64").to_numpy(zero_copy_only=False)
        if not np.isfinite(values).all():
            raise DataMismatch(f"this node's {source.name!r} column {name!r} holds a value that is not finite")
        xs.append(values.astype(np.float32))
    x = np.stack(xs, axis=1) if xs else np.zeros((table.num_rows, 0), np.float32)
    labels = [label_text(v) for v in table.column(spec.label).to_pylist()]
    return np.ascontiguousarray(x), _class_ids(labels, spec.classes, source.name, f"label column {spec.label!r}")


def _images(source: LocalSource, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    if source.format != "imagefolder":
        raise DataMismatch(f"this node's {source.name!r} is {source.format}; the job declares an image folder")
    classes = _image_classes(source.path)
    _class_ids(list(classes), spec.classes, source.name, "image folder's subfolders")
    mode = "L" if spec.channels == 1 else "RGB"
    xs, ys = [], []
    for label, files in classes.items():
        for f in files:
            try:
                with Image.open(f) as img:
                    pixels = np.asarray(img.convert(mode).resize((spec.side, spec.side), Image.Resampling.BILINEAR))
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise DataMismatch(f"this node's image {f} is not readable: {e}") from None
            chw = pixels.reshape(spec.side, spec.side, spec.channels).transpose(2, 0, 1)  # (C, S, S)
            xs.append(chw.reshape(-1).astype(np.float32) / 255.0)
            ys.append(spec.classes.index(label))
    if not xs:
        raise DataMismatch(f"this node's {source.name!r} holds no images")
    return np.stack(xs), np.array(ys, dtype=np.int64)


def _byte_tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _windows(ids: np.ndarray, width: int) -> np.ndarray:
    """Windows of ``width`` tokens at stride width - 1 (consecutive windows share one token), like the bundled
    byte corpus (node/ml/datasets.py)."""
    if ids.size < width:
        return np.zeros((0, width), ids.dtype)
    n = (ids.size - 1) // (width - 1)
    return np.lib.stride_tricks.sliding_window_view(ids, width)[::width - 1][:n]


def _text(source: LocalSource, spec: DataSpec, seed: int, tokenizer: Tokenizer | None):
    if source.format == "imagefolder":
        raise DataMismatch(f"this node's {source.name!r} is an image folder; the job declares text")
    docs, labels = _documents(source)
    tokenize = _byte_tokens if spec.tokenizer == "bytes" else tokenizer
    if tokenize is None:
        raise DataMismatch("the job tokenizes with its model folder's tokenizer, which this node has not loaded")
    dtype = np.uint8 if spec.tokenizer == "bytes" else np.int64
    train_docs, test_docs = _split(len(docs), seed, "documents", source.name)
    if spec.classes:  # classification: each document's first block_size tokens, padded with 0
        if labels is None:
            raise DataMismatch(f"this node's {source.name!r} has no label column; the job classifies text "
                               f"(add it with --label)")
        ids = np.zeros((len(docs), spec.block_size), np.int64)
        for i, doc in enumerate(docs):
            tokens = tokenize(doc)[:spec.block_size]
            ids[i, :len(tokens)] = tokens
        y = _class_ids(labels, spec.classes, source.name, f"label column {source.label!r}")
        return ids[train_docs], y[train_docs], ids[test_docs], y[test_docs]
    width = spec.block_size + 1
    parts = []
    for chosen in (train_docs, test_docs):
        windows, doc_ids = [], []
        for i in chosen:
            w = _windows(np.asarray(tokenize(docs[i]), dtype=dtype), width)
            windows.append(w)
            doc_ids.append(np.full(w.shape[0], i, np.int64))
        x = np.concatenate(windows) if windows else np.zeros((0, width), dtype)
        parts += [np.ascontiguousarray(x), np.concatenate(doc_ids) if doc_ids else np.zeros(0, np.int64)]
    if parts[0].shape[0] == 0 or parts[2].shape[0] == 0:
        raise DataMismatch(f"this node's {source.name!r} has no {'train' if parts[0].shape[0] == 0 else 'test'} "
                           f"document of more than block_size + 1 = {width} tokens")
    return tuple(parts)


def load_for_job(source: LocalSource, spec: DataSpec, seed: int,
                 tokenizer: Tokenizer | None = None) -> NodeData:
    """This node's data for a job declaring ``spec``: split into train and test by ``seed``. DataMismatch (the
    reason to decline) when the files do not hold what the job declares; ValueError when they are unreadable."""
    if spec.kind == "text":
        x, labels, test_x, test_labels = _text(source, spec, seed, tokenizer)
    else:
        features, y = _tabular(source, spec) if spec.kind == "tabular" else _images(source, spec)
        train, test = _split(features.shape[0], seed, "items", source.name)
        x, labels, test_x, test_labels = features[train], y[train], features[test], y[test]
    digest = hashlib.sha256()
    for array in (x, labels, test_x, test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    schema = hashlib.sha256(json.dumps([spec.kind, spec.features, spec.label, spec.classes]).encode()).hexdigest()
    return NodeData(source.name, CLASSIFICATION if spec.classes else CAUSAL_LM, len(spec.classes) or None, x, labels,
                    test_x, test_labels, "own", 1, 0, seed, digest.hexdigest(), schema,
                    {"format": source.format, "kind": spec.kind})


__all__ = ["DataMismatch", "FORMATS", "LocalSource", "add_source", "config_sources", "find_source",
           "inspect_source", "label_text", "list_sources", "load_for_job", "read_table", "sync_config_sources"]
