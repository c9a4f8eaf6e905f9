"""node/jobs/model_files.py: the submitter's folder put into its store (hard links, then verified), fetched by
another node over real libp2p streams (p2pd daemons in this process, port 0, stopped in finally) and verified
file by file against the signed manifest; a holder whose copy was altered is refused with the file's name and
the next holder asked; a manifest asking for code is refused before a byte is fetched."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from node.jobs.model_files import ModelFetchError, ModelStore
from node.ml.hf_models import verified_folder
from node.ml.model_folder import folder_manifest
from protocol.records.job_inputs import ModelFile, check_model_files
from tests.test_hf_models import tiny_gpt2
from tests.test_shard_transfer import daemons


def flip_a_byte(path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))  # the same size: only the sha256 tells


def test_put_links_the_folder_and_checks_it(tmp_path):
    folder = tiny_gpt2(tmp_path / "m")
    files = folder_manifest(folder)
    store = ModelStore(None, tmp_path / "home", "test")  # type: ignore[arg-type]  # put never touches p2p
    copy = store.put(folder, files)
    assert copy.parent == tmp_path / "home" / "models" and verified_folder(files) == copy
    assert os.stat(copy / "model.safetensors").st_ino == os.stat(folder / "model.safetensors").st_ino  # a link
    assert store.put(folder, files) == copy  # again: checked, kept
    changed = check_model_files([f if f.name != "config.json" else ModelFile(f.name, f.size, "0" * 64) for f in files])
    with pytest.raises(ValueError, match="model file config.json does not match the job's manifest"):
        ModelStore(None, tmp_path / "home2", "test").put(folder, changed)  # type: ignore[arg-type]
    assert not list((tmp_path / "home2" / "models").iterdir())  # nothing half-put left behind


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fetch_verifies_every_file_and_refuses_a_tampered_copy(tmp_path, caplog):
    folder = tiny_gpt2(tmp_path / "m")
    files = folder_manifest(folder)

    async def scenario():
        async with daemons(3) as (p_good, p_bad, p_fetch):
            good, bad = ModelStore(p_good, tmp_path / "good", "t"), ModelStore(p_bad, tmp_path / "bad", "t")
            fetcher = ModelStore(p_fetch, tmp_path / "fetcher", "t", timeout=10)
            for s in (good, bad, fetcher):
                await s.start()
            try:
                await asyncio.to_thread(good.put, folder, files)
                tampered = tmp_path / "copy"
                tampered.mkdir()
                for f in files:
                    (tampered / f.name).write_bytes((folder / f.name).read_bytes())
                await asyncio.to_thread(bad.put, tampered, files)
                flip_a_byte(bad.folder(files) / "model.safetensors")  # its store copy altered after the put
                good_id, bad_id = str(p_good.peer_id), str(p_bad.peer_id)
                with pytest.raises(ModelFetchError) as only_bad:
                    await fetcher.ensure(files, [bad_id])
                got = await fetcher.ensure(files, [bad_id, good_id])  # refused from bad, then fetched from good
                return str(only_bad.value), got, bad_id
            finally:
                for s in (good, bad, fetcher):
                    await s.stop()

    message, got, bad_id = asyncio.run(scenario())
    assert message.startswith("model file model.safetensors: no holder served it intact") and "\n" not in message
    assert f"{bad_id[-8:]}: sha256 differs from the job's signed manifest (refused)" in message
    assert got == tmp_path / "fetcher" / "models" / got.name and verified_folder(files) == got
    assert [(p.name, p.read_bytes()) for p in sorted(got.iterdir())] == \
        [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]
    assert not list((tmp_path / "fetcher" / "models").glob(".*"))  # no .incoming or .part left
    assert any("model file model.safetensors from" in r.getMessage() and "refused" in r.getMessage()
               for r in caplog.records)


def test_a_manifest_asking_for_code_is_refused_before_fetching(tmp_path):
    folder = tiny_gpt2(tmp_path / "m")
    files = folder_manifest(folder)
    with_code = check_model_files([*files, ModelFile("modeling_evil.py", 10, "1" * 64)])
    store = ModelStore(None, tmp_path / "home", "t")  # type: ignore[arg-type]  # refused before any stream
    with pytest.raises(ValueError, match="modeling_evil.py is Python code"):
        asyncio.run(store.ensure(with_code, ["12D3KooWnobody"]))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(ValueError, match="config.json names remote code"):
        folder_manifest(folder)
