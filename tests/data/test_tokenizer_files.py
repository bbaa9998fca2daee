"""Every tokenizer-side file travels: source HF tokenizer dir -> `stoker prepare` (pretrain) ->
checkpoint -> `stoker export-hf`, and transformers' tokenizer of the export renders the chat
template as ours does and has the source's pad/unk tokens.

The template is SmolLM2-135M-Instruct's real one (tests/data/test_chat_template.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.data.test_chat_template import make_tokenizer_dir, smollm2_template

from stoker.cli import main
from stoker.config import load_config
from stoker.data.chat_template import load_chat_template
from stoker.data.prepare import prepare, save_tokenizer
from stoker.data.tokenizer import Tokenizer, load_tokenizer_from

SIDE_FILES = ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja")
TINY = [
    "--model.preset=tiny-llama", "--model.n_layer=2", "--model.d_model=32", "--model.n_head=4",
    "--model.n_kv_head=2", "--model.d_ff=64", "--model.max_seq_len=32",
    "--data.sources=python-stdlib", "--data.max_documents=12", "--train.batch_size=4",
    "--train.micro_batch_size=4", "--train.max_steps=2", "--train.log_interval=1",
    "--train.eval_interval=2", "--train.eval_steps=1", "--train.save_interval=2",
    "--train.precision=fp32",
]  # fmt: skip
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another?"},
]


def source_tokenizer(d: Path, where: str) -> Path:
    """A tokenizer dir with SmolLM2's template in tokenizer_config.json ("config"), or in
    chat_template.jinja next to a special_tokens_map.json ("jinja"); pad and unk tokens."""
    specials = {"pad_token": "<|endoftext|>", "unk_token": "</s>"}
    template = smollm2_template()
    make_tokenizer_dir(d, template if where == "config" else None, **specials)
    if where == "jinja":
        (d / "chat_template.jinja").write_text(template, encoding="utf-8")
        (d / "special_tokens_map.json").write_text(json.dumps(specials))
    return d


def transformers_view(directory: Path) -> dict:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(directory)
    render = lambda **kw: hf.apply_chat_template(MESSAGES, tokenize=False, **kw)
    ids = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    return {
        "text": render(),
        "prompt": render(add_generation_prompt=True),
        "ids": list(ids),
        "pad": hf.pad_token,
        "unk": hf.unk_token,
        "eos": hf.eos_token,
    }


@pytest.mark.parametrize("where", ["config", "jinja"])
def test_chat_template_and_special_tokens_survive_prepare_train_export(tmp_path, where):
    src = source_tokenizer(tmp_path / "src_tok", where)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: pretrain\n")
    vocab = Tokenizer.load(src).vocab_size
    args = [
        str(recipe), *TINY, f"--model.vocab_size={vocab}", f"--data.tokenizer.path={src}",
        f"--data.dir={tmp_path / 'data'}", f"--train.out_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert main(["prepare", *args]) == 0
    assert main(["train", *args]) == 0
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0

    data_tok = tmp_path / "data" / "tokenizer"
    (ckpt_tok,) = (tmp_path / "run").glob("checkpoints/step-*/tokenizer")
    for name in SIDE_FILES:  # byte for byte at every stage, when the source has the file
        if (src / name).is_file():
            for stage in (data_tok, ckpt_tok, tmp_path / "hf"):
                assert (stage / name).read_bytes() == (src / name).read_bytes(), (stage, name)
    config = json.loads((ckpt_tok / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<|endoftext|>" and config["unk_token"] == "</s>"
    assert config.get("chat_template") == (smollm2_template() if where == "config" else None)

    ours = load_chat_template(src)
    exported, source = transformers_view(tmp_path / "hf"), transformers_view(src)
    assert exported["text"] == ours.render(MESSAGES) == source["text"]
    assert exported["prompt"] == ours.render(MESSAGES, add_generation_prompt=True)
    assert exported["ids"] == source["ids"]
    assert (exported["pad"], exported["unk"]) == (source["pad"], source["unk"])
    assert (exported["pad"], exported["unk"]) == ("<|endoftext|>", "</s>")
    assert exported["eos"] == Tokenizer.load(tmp_path / "hf").eos_token == "<|endoftext|>"


def test_a_changed_chat_template_re_prepares(tmp_path):
    src = source_tokenizer(tmp_path / "src_tok", "jinja")
    overrides = [*TINY, "--data.max_documents=3", f"--data.tokenizer.path={src}"]
    cfg = load_config(None, [*overrides, f"--data.dir={tmp_path / 'data'}"])
    first = prepare(cfg)
    (src / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    second = prepare(cfg)
    assert second["fingerprint"] != first["fingerprint"]
    out = tmp_path / "data" / "tokenizer" / "chat_template.jinja"
    assert out.read_text() == "{{ messages[0]['content'] }}"


def test_tokenizer_file_brings_its_dir_but_a_lone_file_only_itself(tmp_path):
    """`data.tokenizer.path` = DIR/tokenizer.json keeps DIR's side files; another .json file
    in a dir that describes a different tokenizer must not pick up that dir's files."""
    src = source_tokenizer(tmp_path / "src_tok", "jinja")
    tok = load_tokenizer_from(src / "tokenizer.json")
    save_tokenizer(tok, str(src / "tokenizer.json"), tmp_path / "a")
    assert (tmp_path / "a" / "chat_template.jinja").is_file()
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["pad_token"]

    other = tmp_path / "other"
    shutil.copytree(src, other)
    shutil.copy(src / "tokenizer.json", other / "mine.json")
    (other / "tokenizer.json").write_text("not this one")
    save_tokenizer(
        load_tokenizer_from(other / "mine.json"), str(other / "mine.json"), tmp_path / "b"
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert Tokenizer.load(tmp_path / "b").encode("def f(x):") == tok.encode("def f(x):")
