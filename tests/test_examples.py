"""The example jobs of examples/ against the data examples/prepare_data.py writes: every file parses, and the
prepared parts match the jobs' declarations the way each node checks them (no mismatch, models sized from them)."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

import pytest

from node.jobs.spec import job_spec_from_text
from node.ml.job_model import data_misfit, job_model_config, load_job_data
from node.ml.model_folder import folder_manifest
from node.ml.user_data import add_source

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def prepare(what: str, out: pathlib.Path, *args: str) -> None:
    """examples/prepare_data.py's main in this process (its command line is the same)."""
    spec = importlib.util.spec_from_file_location("prepare_data", EXAMPLES / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([what, "--out", str(out), *args]) == 0


@pytest.mark.parametrize(("job", "what", "bind"), [
    ("wine_csv.toml", "tables", lambda out, i: (out / f"wine-{i}.csv", "csv", "cultivar")),
    ("digits_images.toml", "images", lambda out, i: (out / f"digits-{i}", "imagefolder", "")),
])
def test_prepared_parts_match_the_example_jobs(tmp_path, job, what, bind):
    prepare(what, tmp_path / "data", "--nodes", "2")
    spec = job_spec_from_text((EXAMPLES / job).read_text(), job)
    cfg = job_model_config(spec)
    for i in range(2):
        path, fmt, label = bind(tmp_path / "data", i)
        add_source(tmp_path / f"node{i}", spec.dataset, path, fmt, label=label)
        data = load_job_data(spec, tmp_path / f"node{i}")
        assert data.n_train > 20 and data_misfit(spec, cfg, data) == ""


def test_the_lora_example_names_a_model_folder_and_text(tmp_path):
    prepare("gpt2", tmp_path / "data", "--steps", "2")
    prepare("text", tmp_path / "data", "--nodes", "2")
    shutil.copy(EXAMPLES / "lora_text.toml", tmp_path / "lora_text.toml")
    spec = job_spec_from_text((tmp_path / "lora_text.toml").read_text(), "lora_text.toml",
                              model_folder=lambda p: folder_manifest(tmp_path / p))
    assert spec.model.arch == "hf" and {f.name for f in spec.model.files} >= {"config.json", "model.safetensors"}
    assert spec.adapter is not None and spec.adapter.r == 8
    for i in range(2):
        add_source(tmp_path / f"node{i}", "docs", tmp_path / "data" / f"docs-{i}", "text")
        assert load_job_data(spec, tmp_path / f"node{i}").x.shape[1] == 65
