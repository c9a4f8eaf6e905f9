"""A local Hugging Face model folder as a job names it: its manifest, and the checks that keep remote code out.

    files = folder_manifest("./my-model")      # (ModelFile(name, size, sha256), ...) sorted; ValueError if unfit
    check_folder_against(folder, files)         # every file present with its size and sha256; ValueError if not

A folder is config.json plus safetensors weights and, optionally, a tokenizer's files (tokenizer.json,
tokenizer_config.json, vocab/merges, special_tokens_map.json, generation_config.json ...). Refused with the
reason: a config or tokenizer config that names remote code (``auto_map``: transformers would need
``trust_remote_code``, which swarmnode never passes), pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``,
``*.pkl``: loading them can run code; convert them to safetensors), Python files, symlinks leaving the folder,
and folders beyond the manifest's limits (protocol/records/job_inputs.py). Hidden files and folders (``.git``,
``.cache``) are not part of the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from protocol.records.job_inputs import MAX_MODEL_FILES, ModelFile, check_model_files

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
REMOTE_CODE_KEYS = ("auto_map",)
CONFIGS_NAMING_CODE = ("config.json", "tokenizer_config.json", "processor_config.json",
                       "preprocessor_config.json")
HASH_CHUNK = 1 << 20


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _model_paths(root: pathlib.Path) -> list[pathlib.Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = pathlib.Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
                raise ValueError(f"model.path: {path} links outside the model folder")
            found.append(path)
            if len(found) > MAX_MODEL_FILES:
                raise ValueError(f"model.path: {root} holds more than {MAX_MODEL_FILES} files; a model folder is "
                                 f"config.json, safetensors weights and a tokenizer")
    return found


def check_no_remote_code(root: pathlib.Path, names: list[str]) -> None:
    """ValueError naming the file when the folder asks for code to run: remote code in a config, pickled
    weights, Python files."""
    for name in names:
        suffix = pathlib.PurePosixPath(name).suffix.lower()
        if suffix in PICKLED:
            raise ValueError(f"model.path: {name} holds pickled weights, which can run code when loaded; save the "
                             f"model with safetensors (save_pretrained(..., safe_serialization=True))")
        if suffix == ".py":
            raise ValueError(f"model.path: {name} is Python code; swarmnode runs no code from a model folder "
                             f"(never trust_remote_code)")
    for name in CONFIGS_NAMING_CODE:
        path = root / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"model.path: {path} is not readable JSON ({e})") from None
        for key in REMOTE_CODE_KEYS:
            if isinstance(config, dict) and key in config:
                raise ValueError(f"model.path: {name} names remote code ({key!r}); swarmnode never runs code from a "
                                 f"model folder (trust_remote_code); use an architecture transformers ships")


def folder_manifest(path: str | os.PathLike) -> tuple[ModelFile, ...]:
    """The manifest of the model folder at ``path``: every file's relative name, size and sha256."""
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"model.path: no model folder at {root}")
    paths = _model_paths(root)
    names = [p.relative_to(root).as_posix() for p in paths]
    if "config.json" not in names:
        raise ValueError(f"model.path: {root} has no config.json (save the model with save_pretrained)")
    if not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"model.path: {root} has no *.safetensors weights (save_pretrained(..., "
                         f"safe_serialization=True))")
    check_no_remote_code(root, names)
    try:
        return check_model_files([ModelFile(n, p.stat().st_size, sha256_file(p)) for n, p in zip(names, paths)])
    except OSError as e:
        raise ValueError(f"model.path: cannot read {root}: {e.strerror or e}") from None


def check_folder_against(folder: str | os.PathLike, files: tuple[ModelFile, ...]) -> None:
    """ValueError naming the first file of ``files`` that is missing under ``folder`` or differs from the
    manifest (size, then sha256), or a file the folder holds beyond it."""
    root = pathlib.Path(folder)
    for f in files:
        path = root / f.name
        if not path.is_file():
            raise ValueError(f"model file {f.name} is missing from {root}")
        if path.stat().st_size != f.size:
            raise ValueError(f"model file {f.name} has {path.stat().st_size} bytes, the job's manifest {f.size}")
        if sha256_file(path) != f.sha256:
            raise ValueError(f"model file {f.name} does not match the job's manifest (sha256 differs)")
    check_no_remote_code(root, [f.name for f in files])


__all__ = ["check_folder_against", "check_no_remote_code", "folder_manifest", "sha256_file"]
