"""DYNAMO's network invariants: gates act inside the encoder only, zero gates are the frozen
backbone, one-hot gates are one adapter exactly, the router reads the frozen encoding, and the
routing helpers (straight-through, balance) do what they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stoker.config import EncoderConfig, LoRAConfig
from stoker.models.dynamo import (
    DynamoModel,
    balance_loss,
    gates_from_logits,
    masked_mean,
    per_row_mean,
)
from stoker.models.encoder import build_encoder
from stoker.models.lora import apply_lora
from stoker.models.lora_mixture import mixture_layers
from stoker.tasks.dynamo.seq2seq import padding_mask, seq2seq_mask

TASKS = [("sent", "classify", 3), ("qa", "qa", 0), ("gen", "seq2seq", 0)]


def make_model(seed: int = 0) -> DynamoModel:
    torch.manual_seed(seed)
    enc = build_encoder(EncoderConfig(n_layer=2, n_head=4, d_model=32, vocab_size=97,
                                      max_seq_len=32))  # fmt: skip
    m = DynamoModel(enc, TASKS, LoRAConfig(r=4, alpha=8, targets="all-linear"), 16, 0.0,
                    head_dropout=0.0)  # fmt: skip
    with torch.no_grad():  # adapters that do something (B starts at zero)
        for layer in mixture_layers(m).values():
            layer.lora_B.normal_(0, 0.1)
    return m.eval()


def make_batch(B: int = 6, T: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, T), generator=g)
    length = torch.randint(T // 2, T + 1, (B,), generator=g)
    length[0] = T
    task = torch.arange(B) % 3
    source_len = torch.where(task == 2, length // 2, length)
    mask = torch.where((task == 2)[:, None, None], seq2seq_mask(source_len, length, T),
                       padding_mask(length, T))  # fmt: skip
    pos = torch.arange(T)[None]
    labels = torch.full((B, T), -100)
    gen = (task == 2)[:, None] & (pos >= source_len[:, None] - 1) & (pos < length[:, None] - 1)
    labels[gen] = torch.roll(ids, -1, 1)[gen]
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "mask": mask,
            "source_mask": pos < source_len[:, None], "task": task, "labels": labels,
            "label": torch.where(task == 0, torch.arange(B) % 3, -100),
            "start": torch.where(task == 1, 1, -100), "end": torch.where(task == 1, 3, -100)}  # fmt: skip


def test_zero_gates_are_the_frozen_backbone():
    m, b = make_model(), make_batch()
    with torch.no_grad():
        ours = m.encode(b, torch.zeros(6, 3))
    torch.manual_seed(0)  # the same encoder without any adapter
    base = build_encoder(EncoderConfig(n_layer=2, n_head=4, d_model=32, vocab_size=97,
                                       max_seq_len=32))  # fmt: skip
    with torch.no_grad():
        ref = base(b["input_ids"], token_type_ids=b["token_type_ids"], attn_mask=b["mask"])
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_hot_gates_are_that_single_adapter(k):
    m, b = make_model(), make_batch()
    torch.manual_seed(0)
    single = build_encoder(EncoderConfig(n_layer=2, n_head=4, d_model=32, vocab_size=97,
                                         max_seq_len=32))  # fmt: skip
    apply_lora(single, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    mods = dict(single.named_modules())
    with torch.no_grad():
        for name, layer in mixture_layers(m).items():
            A, B = layer.adapter(k)
            mods[name.removeprefix("encoder.")].lora_A.copy_(A)
            mods[name.removeprefix("encoder.")].lora_B.copy_(B)
        ours = m.encode(b, F.one_hot(torch.full((6,), k), 3).float())
        ref = single(b["input_ids"], token_type_ids=b["token_type_ids"], attn_mask=b["mask"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_gates_never_touch_head_logits():
    """With every adapter's B at zero, gates of any size leave every head's logits as they
    are: the gates reach the outputs only through the adapters inside the encoder."""
    m, b = make_model(), make_batch()
    for layer in mixture_layers(m).values():
        layer.lora_B.data.zero_()
    with torch.no_grad():
        a = m(b, gates=torch.zeros(6, 3))["outputs"]
        c = m(b, gates=torch.rand(6, 3) * 10)["outputs"]
    for k in a:
        for key in ("logits", "start", "end"):
            if key in a[k]:
                assert torch.equal(a[k][key], c[k][key])


def test_router_reads_the_frozen_encoding_of_the_source():
    m, b = make_model(), make_batch()
    with torch.no_grad():
        feats = m.route_features(b)
        for layer in mixture_layers(m).values():  # adapters change: the router input does not
            layer.lora_B.mul_(3)
        assert torch.equal(feats, m.route_features(b))
        b2 = dict(b, input_ids=b["input_ids"].clone())
        row = 2  # a seq2seq row: its target tokens change, its router input does not
        b2["input_ids"][row, b["source_mask"][row].sum() :] = 5
        torch.testing.assert_close(m.route_features(b2)[row], feats[row], rtol=0, atol=1e-6)


def test_example_losses_are_per_example_means():
    m, b = make_model(), make_batch()
    with torch.no_grad():
        out = m(b, gates=F.one_hot(b["task"], 3).float())
        for i in range(6):  # each example alone gives its own loss
            one = {k: v[i : i + 1] for k, v in b.items()}
            alone = m(one, gates=F.one_hot(one["task"], 3).float())["losses"]
            torch.testing.assert_close(alone[0], out["losses"][i], rtol=1e-5, atol=1e-5)


def test_straight_through_gates_are_one_hot_forward_with_soft_gradients():
    logits = torch.randn(5, 4, requires_grad=True)
    hard = gates_from_logits(logits, 0.7, straight_through=True)
    torch.testing.assert_close(hard, F.one_hot(logits.argmax(-1), 4).float(), rtol=0, atol=1e-6)
    w = torch.randn(5, 4)
    (hard * w).sum().backward()
    g_st = logits.grad.clone()
    logits.grad = None
    (gates_from_logits(logits, 0.7) * w).sum().backward()
    torch.testing.assert_close(g_st, logits.grad)


def test_balance_loss_is_one_when_balanced_and_k_when_collapsed():
    K = 4
    balanced = torch.eye(K).repeat(2, 1) * 10
    assert balance_loss(balanced, torch.softmax(balanced, -1)) == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.zeros(8, K)
    collapsed[:, 0] = 10
    assert balance_loss(collapsed, torch.softmax(collapsed, -1)) == pytest.approx(K, abs=1e-3)


def test_masked_mean_and_per_row_mean():
    h = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]]).bool()
    torch.testing.assert_close(masked_mean(h, mask), torch.stack([h[0, :2].mean(0), h[1, 2]]))
    v = torch.tensor([1.0, 3.0, 5.0])
    torch.testing.assert_close(per_row_mean(v, torch.tensor([0, 0, 2]), 3),
                               torch.tensor([2.0, 0.0, 5.0]))  # fmt: skip


def test_segment_pooling_reads_the_question_and_the_context_apart():
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(n_layer=2, n_head=4, d_model=32, vocab_size=97,
                                      max_seq_len=32))  # fmt: skip
    m = DynamoModel(enc, TASKS, LoRAConfig(r=4, alpha=8, targets="all-linear"), 16, 0.0,
                    router_pool="segments").eval()  # fmt: skip
    b = make_batch()
    second = torch.zeros_like(b["source_mask"])
    second[1, 5:] = b["source_mask"][1, 5:]  # row 1 (a qa row): tokens 5.. are its context
    b["second_mask"] = second
    with torch.no_grad():
        feats = m.route_features(b)  # (B, 2C)
        hidden = m.encode(b, torch.zeros(len(b["task"]), 3))
    assert feats.shape == (6, 64) and m.router.net[0].in_features == 64
    first = b["source_mask"] & ~second
    torch.testing.assert_close(feats[:, :32], masked_mean(hidden, first))
    torch.testing.assert_close(feats[1, 32:], hidden[1][second[1]].mean(0))
    assert not feats[0, 32:].any()  # a single-text row: zeros for the second segment
