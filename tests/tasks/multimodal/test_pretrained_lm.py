"""Phase 2 on a pretrained decoder (`multimodal.lm.init_from`): a stoker checkpoint of a tiny
llama with a BPE tokenizer and SmolLM2's real chat template (ChatML). Conversations render
with the template, the placeholders are single tokens of that tokenizer repeated n_tokens
times, labels cover the answer and `<|im_end|>`, no `lm` stage runs, and phase 2 trains."""

from pathlib import Path

import pytest
import torch
from tests.data.test_chat_template import make_tokenizer_dir, smollm2_template

from stoker.config import ModelConfig, RecipeConfig, load_config
from stoker.data.tokenizer import Tokenizer
from stoker.errors import StokerError
from stoker.models.gpt import build_model
from stoker.tasks.multimodal import chat
from stoker.tasks.multimodal.hf_chat import HFChat
from stoker.train.checkpoint import save_model_checkpoint

ROOT = Path(__file__).parents[3]
TAGS = {"image": "<|begin_of_text|>", "audio": "<|start_header_id|>"}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    tok_dir = make_tokenizer_dir(tmp_path_factory.mktemp("tok"), smollm2_template(),
                                 pad_token="<|endoftext|>")  # fmt: skip
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size,
                      max_seq_len=256, init_std=0.3)  # fmt: skip
    out = tmp_path_factory.mktemp("lm") / "ckpt"
    config = RecipeConfig(model=cfg).model_dump(mode="json")
    return save_model_checkpoint(out, build_model(cfg), config, tokenizer_dir=tok_dir)


def test_render_splices_placeholders_and_labels_the_answer(decoder):
    tok = HFChat(decoder / "tokenizer", TAGS)
    record = {"messages": [{"role": "user", "content": "<image> Which digit is shown?"},
                           {"role": "assistant", "content": "7"}], "image": "a.png"}  # fmt: skip
    s = tok.render(record, ["image", "audio"], 4, "test")
    assert s.ids.count(tok.tag_ids["image"]) == 4 and s.ids.count(tok.tag_ids["audio"]) == 4
    assert s.ids.index(tok.tag_ids["audio"]) < s.ids.index(tok.tag_ids["image"])  # missing first
    answer = [t for t in s.labels if t != chat.IGNORE]
    assert tok.decode(answer).startswith("7") and tok.end_id in answer
    assert s.labels[: s.prompt_len] == [chat.IGNORE] * s.prompt_len
    with pytest.raises(StokerError, match="not one"):
        HFChat(decoder / "tokenizer", {"image": "not a token", "audio": TAGS["audio"]})


@pytest.mark.slow
def test_phase2_adapts_the_pretrained_decoder_without_an_lm_stage(decoder, digits_data,
                                                                 tmp_path):  # fmt: skip
    from stoker.train.loop import train

    cfg = load_config(ROOT / "recipes/multimodal/digits.yaml", [
        f"--data.dir={digits_data}", f"--train.out_dir={tmp_path / 'run'}",
        f"--multimodal.lm.init_from={decoder}",
        f"--multimodal.lm.image_token={TAGS['image']}",
        f"--multimodal.lm.audio_token={TAGS['audio']}",
        "--multimodal.image.pretrain_steps=30", "--multimodal.audio.pretrain_steps=30",
        "--multimodal.aligner.max_steps=30", "--multimodal.phase2.max_steps=30",
        "--multimodal.phase2.eval_interval=30", "--data.eval_examples=16"])  # fmt: skip
    summary = train(cfg)
    assert list(summary["stages"]) == ["encoder:image", "encoder:audio", "phase1", "phase2"]
    from stoker.train.tracking import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "phase2") if "loss" in r]
    assert losses[-1] < 0.85 * losses[0], losses  # LoRA + projectors learn on the decoder
    assert not (tmp_path / "run" / "lm").exists()
    from stoker.validate import run_validation

    results, _ = run_validation(str(ROOT / "recipes/multimodal/digits.yaml"), [
        f"--data.dir={digits_data}", f"--multimodal.lm.init_from={decoder}",
        f"--multimodal.lm.image_token={TAGS['image']}",
        f"--multimodal.lm.audio_token={TAGS['audio']}"], True,
        ["freezing", "checkpoint"])  # fmt: skip
    bad = [(r.unit, r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad
