"""The fused LM head + cross-entropy (models/loss.py): the same loss and gradients as
autocast's head + `lm_loss_sum`, ignored targets, frozen heads, chunking, the Decoder's
`targets=` path (fp32 untouched bit for bit) and 50 bf16 training steps against the plain
path."""

import pytest
import torch

from stoker.config import ModelConfig, OptimConfig
from stoker.models import loss as fused_loss
from stoker.models.gpt import build_model, lm_loss_sum
from stoker.models.loss import linear_cross_entropy
from stoker.train.optim import build_optimizer

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def inputs(n=37, c=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, requires_grad=True)
    weight = (torch.randn(v, c, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100  # some ignored
    return hidden, weight, targets


def plain(hidden, weight, targets):
    with torch.autocast(**BF16):
        return lm_loss_sum(torch.nn.functional.linear(hidden, weight)[None], targets[None])


@pytest.mark.parametrize("chunk", [1 << 21, 200])  # one chunk; 4 rows per chunk
def test_loss_and_gradients_match_autocasts_head_and_loss(chunk, monkeypatch):
    monkeypatch.setitem(fused_loss.CHUNK_ELEMENTS, "cpu", chunk)
    h1, w1, t = inputs()
    h2, w2, _ = inputs()
    with torch.autocast(**BF16):
        total, count = linear_cross_entropy(h1, w1, t)
    ref_total, ref_count = plain(h2, w2, t)
    assert total.dtype == torch.float32 and int(count) == int(ref_count) == 29
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    (total / count).backward()
    (ref_total / ref_count).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-3)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=2e-3)
    assert h1.grad[::5].abs().max() == 0  # ignored rows get no gradient


def test_without_autocast_it_is_the_fp32_loss_and_without_grad_it_keeps_nothing():
    h, w, t = inputs()
    total, _ = linear_cross_entropy(h, w, t)
    ref, _ = lm_loss_sum(torch.nn.functional.linear(h, w)[None], t[None])
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-5)
    with torch.no_grad(), torch.autocast(**BF16):
        loss, _ = linear_cross_entropy(h, w, t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, plain(h, w, t)[0], rtol=1e-5, atol=1e-5)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    h1, w, t = inputs()
    w.requires_grad_(False)
    h2 = h1.detach().clone().requires_grad_()
    with torch.autocast(**BF16):
        total, _ = linear_cross_entropy(h1, w, t)
    total.backward()
    plain(h2, w, t)[0].backward()
    assert w.grad is None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-3)


def test_decoder_targets_path_is_the_logits_path_in_fp32_bit_for_bit():
    cfg = ModelConfig(preset="tiny-llama")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.fused_loss = True  # fp32: not fused all the same
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    total, count = model(x, targets=y)
    ref_total, ref_count = lm_loss_sum(model(x), y)
    assert torch.equal(total, ref_total) and torch.equal(count, ref_count)


def test_fifty_bf16_steps_stay_within_1e_2_of_the_plain_autocast_path():
    """The tiny recipe's model shape, 50 AdamW steps at the demo's lr under bf16 autocast:
    the fused head + loss against logits + lm_loss_sum, from the same weights and batches."""
    cfg = ModelConfig(
        preset="tiny-llama", n_layer=4, d_model=128, d_ff=384, vocab_size=2048, max_seq_len=64
    )
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.fused_loss = fused
        opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1), "cpu")
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(50):
            ids = torch.randint(0, 64, (4, 65), generator=g)  # a learnable, small-support stream
            x, y = ids[:, :-1], ids[:, 1:]
            with torch.autocast(**BF16):
                total, count = model(x, targets=y)
            loss = total / count
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs.append(losses)
    fused_losses, plain_losses = runs
    assert plain_losses[-1] < plain_losses[0] - 2  # it trained
    assert max(abs(a - b) for a, b in zip(fused_losses, plain_losses, strict=True)) < 1e-2


def test_train_fused_loss_setting_auto_is_cuda_only():
    from stoker.models.loss import use_fused_loss

    model = build_model(ModelConfig(preset="tiny-llama"))
    for setting, device, want in [
        ("auto", "cpu", False),
        ("auto", "cuda", True),
        ("on", "cpu", True),
        ("off", "cuda", False),
    ]:
        use_fused_loss(model, setting, torch.device(device))
        assert model.fused_loss is want
