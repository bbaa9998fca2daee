"""Invariances and accounting of `stoker.models.encoder` (BERT, RoBERTa), tiny shapes, CPU.

Parity with `transformers` lives in test_hf_encoder.py. Here: padding must not change the
hidden states of real tokens (the key-padding mask, and RoBERTa's pad-skipping positions), the
closed-form parameter count equals `sum(p.numel())`, pad rows get no gradient, bad configs and
inputs are refused. Tolerance (float32, CPU): atol = rtol = 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from stoker.config import validate_config
from stoker.errors import StokerError
from stoker.models.encoder import EncoderConfig, build_encoder, count_encoder_params

TOL = dict(atol=1e-5, rtol=1e-5)
ARCHS = {
    "bert": dict(arch="bert", pad_token_id=0, type_vocab_size=2),
    "roberta": dict(arch="roberta", pad_token_id=1, type_vocab_size=1, max_seq_len=40),
}


def tiny(arch: str, **kw) -> EncoderConfig:
    return EncoderConfig(n_layer=2, n_head=4, d_model=32, d_ff=64, vocab_size=97,
                         **{**ARCHS[arch], **kw})  # fmt: skip


def real_ids(cfg: EncoderConfig, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (1, n), generator=g)
    return ids  # ids 0 and 1 (the pads) never occur


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_real_token_states(arch):
    cfg = tiny(arch)
    torch.manual_seed(0)
    model = build_encoder(cfg).eval()
    short, long = real_ids(cfg, 7, 1), real_ids(cfg, 12, 2)
    pad = torch.full((1, 5), cfg.pad_token_id)
    ids = torch.cat([torch.cat([short, pad], 1), long])  # (2, 12), row 0 right-padded
    mask = (ids != cfg.pad_token_id).long()
    types = torch.zeros_like(ids)
    if cfg.type_vocab_size > 1:
        types[:, 4:] = 1  # a second segment, as a pair encoding has
    with torch.no_grad():
        batched = model(ids, mask, types)  # (2, 12, C)
        alone = model(short, token_type_ids=types[:1, :7])  # (1, 7, C)
        alone_long = model(long, token_type_ids=types[1:])
    assert_close(batched[0, :7], alone[0], **TOL)
    assert_close(batched[1], alone_long[0], **TOL)


def test_roberta_positions_skip_pads_and_start_after_pad_id():
    model = build_encoder(tiny("roberta"))
    ids = torch.tensor([[0, 5, 1, 7, 1, 1], [0, 5, 6, 7, 8, 2]])
    positions = model.embeddings.position_ids(ids)
    assert positions.tolist() == [[2, 3, 1, 4, 1, 1], [2, 3, 4, 5, 6, 7]]


def test_bert_positions_count_every_token():
    model = build_encoder(tiny("bert"))
    assert model.embeddings.position_ids(torch.zeros(3, 5, dtype=torch.long)).tolist() == [
        [0, 1, 2, 3, 4]
    ]


@pytest.mark.parametrize("use_pooler", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_closed_form_param_count_equals_numel(arch, use_pooler):
    cfg = tiny(arch, use_pooler=use_pooler)
    model = build_encoder(cfg, device="meta")
    assert count_encoder_params(cfg) == sum(p.numel() for p in model.parameters())


def test_pad_rows_get_no_gradient_and_start_at_zero():
    cfg = tiny("roberta")
    model = build_encoder(cfg)
    word, pos = model.embeddings.word_embeddings.weight, model.embeddings.position_embeddings.weight
    assert not word[cfg.pad_token_id].any() and not pos[cfg.pad_token_id].any()
    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])
    probe = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))  # LN sums are ~0
    (model(ids, (ids != 1).long()) * probe).sum().backward()
    assert not word.grad[cfg.pad_token_id].any() and not pos.grad[cfg.pad_token_id].any()
    assert word.grad[5].abs().sum() > 0


def test_dropout_is_active_in_training_only():
    cfg = tiny("bert", dropout=0.3)
    model = build_encoder(cfg)
    ids = real_ids(cfg, 9, 3)
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_pooler_is_tanh_of_dense_on_first_token():
    model = build_encoder(tiny("bert", use_pooler=True)).eval()
    h = model(real_ids(model.config, 6, 4))
    assert_close(model.pool(h), torch.tanh(model.pooler.dense(h[:, 0])), **TOL)


def test_pool_without_pooler_raises():
    model = build_encoder(tiny("bert"))
    with pytest.raises(ValueError, match="no pooler"):
        model.pool(torch.zeros(1, 3, 32))


@pytest.mark.parametrize("arch, usable", [("bert", 128), ("roberta", 38)])
def test_too_long_input_names_the_limit(arch, usable):
    cfg = tiny(arch)
    assert cfg.max_tokens == usable
    model = build_encoder(cfg)
    model(real_ids(cfg, usable, 5))  # the longest that fits
    with pytest.raises(ValueError, match=f"{usable + 1} tokens exceed the {usable} positions"):
        model(real_ids(cfg, usable + 1, 5))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=30, n_head=4), "encoder.d_model=30 is not divisible"),
        (dict(arch="roberta", pad_token_id=None), "needs pad_token_id"),
        (dict(arch="roberta", pad_token_id=1, max_seq_len=2), "leaves no RoBERTa positions"),
        (dict(pad_token_id=600, vocab_size=512), "outside the vocabulary"),
        (dict(arch="albert"), "arch"),
        (dict(n_layers=2), "n_layers"),
    ],
)
def test_bad_config_is_one_line_error(fields, message):
    with pytest.raises(StokerError, match=message) as e:
        validate_config(fields, EncoderConfig)
    assert "\n" not in str(e.value)
