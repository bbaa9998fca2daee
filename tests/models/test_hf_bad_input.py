"""`stoker import-hf` of a broken Hugging Face directory: one line naming the file, exit 2.

Truncated or garbage safetensors, pickle weights (a `pytorch_model.bin` only, or pickle bytes
under a `.safetensors` name: never unpickled), a broken sharded index, and a config.json that
is not JSON or not UTF-8. Tiny random LLaMA (2 layers, width 32) written by `transformers`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stoker.cli import main
from stoker.models.hf import load_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def copy_of(src: Path, dst: Path, *, weights: bool = True) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if weights:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    return dst


def import_error(src: Path, out: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["import-hf", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    return err


def test_truncated_safetensors_names_the_file(hf_dir, tmp_path, capsys):
    d = copy_of(hf_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    for keep in (weights.stat().st_size // 2, 20, 3, 0):  # body, header, length prefix, empty
        weights.write_bytes((hf_dir / "model.safetensors").read_bytes()[:keep])
        err = import_error(d, tmp_path / "out", capsys)
        assert f"{weights}: is not a readable safetensors file (" in err
        assert "re-download" in err


def test_pytorch_bin_only_is_refused_without_unpickling(hf_dir, tmp_path, capsys, monkeypatch):
    d = copy_of(hf_dir, tmp_path / "m", weights=False)
    torch.save(load_file(hf_dir / "model.safetensors"), d / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", None)  # stoker must never call it: a call would raise
    err = import_error(d, tmp_path / "out", capsys)
    assert f"{d}: holds only pickle weights (pytorch_model.bin)" in err
    assert "loads only safetensors" in err and "save_pretrained" in err
    monkeypatch.undo()
    # the conversion the message suggests makes the directory importable
    transformers.AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)
    assert main(["import-hf", str(d), str(tmp_path / "out")]) == 0
    want = load_hf_model(hf_dir).state_dict()
    got = load_hf_model(d).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kind", ["torch.save", "pickle protocol 2"])
def test_pickle_bytes_under_a_safetensors_name_are_refused(hf_dir, tmp_path, capsys, kind):
    import pickle

    d = copy_of(hf_dir, tmp_path / "m", weights=False)
    weights = d / "model.safetensors"
    if kind == "torch.save":
        torch.save(load_file(hf_dir / "model.safetensors"), weights)
    else:
        weights.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    err = import_error(d, tmp_path / "out", capsys)
    assert f"{weights}: is not a safetensors file but pickle bytes" in err
    assert "loads only safetensors" in err


def test_broken_sharded_index_names_the_index_or_the_shard(hf_dir, tmp_path, capsys):
    d = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(d, max_shard_size="20KB")
    index = d / "model.safetensors.index.json"
    good = index.read_text()
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert f"{shard}: is not a readable safetensors file" in import_error(d, tmp_path / "o", capsys)
    shard.unlink()
    assert f"{shard}: is missing" in import_error(d, tmp_path / "o", capsys)
    index.write_text(good[: len(good) // 2])
    err = import_error(d, tmp_path / "o", capsys)
    assert f"{index}: is not a readable safetensors index (" in err
    index.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    assert "has no weight_map of .safetensors files" in import_error(d, tmp_path / "o", capsys)


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"architectures": ["LlamaForCausalLM"], "hidden', "is not valid JSON (Unterminated"),
        (b'{"model_type": "llama\xff"}', "is not UTF-8"),
        (b"", "is not valid JSON (Expecting value: line 1 column 1)"),
    ],
    ids=["truncated", "not-utf8", "empty"],
)
def test_config_json_that_is_not_json_names_it(hf_dir, tmp_path, capsys, content, words):
    d = copy_of(hf_dir, tmp_path / "m")
    (d / "config.json").write_bytes(content)
    err = import_error(d, tmp_path / "out", capsys)
    assert f"{d / 'config.json'}: " in err and words in err
