"""Decoder invariants: preset parameter counts, KV cache = full forward, causality, init."""

import pytest
import torch

from stoker.config import PRESETS, ModelConfig
from stoker.models.gpt import build_model, lm_loss

# docs/scaling.md §1 (smollm-360m computed from its shape: 32·9,832,320 + 960 + 49152·960).
REFERENCE_PARAMS = {
    "llama-1.36b": 1_294_159_104,
    "gpt2-1.36b": 1_404_968_832,
    "gpt2-124m": 124_439_808,
    "smollm-360m": 361_821_120,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("preset", sorted(REFERENCE_PARAMS))
def test_preset_param_count_matches_reference(preset):
    model = build_model(ModelConfig(preset=preset), device="meta")
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[preset]


def test_llama_ffn_rule():
    assert ModelConfig(arch="llama", d_model=2304, n_head=18).ffn_dim == 6144
    assert ModelConfig(arch="llama", d_model=4096, n_head=32).ffn_dim == 11008


def test_every_preset_builds_on_meta():
    for name in PRESETS:
        build_model(ModelConfig(preset=name), device="meta")


def _tiny(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(arch=arch, n_layer=2, n_head=4, d_model=32, vocab_size=97, max_seq_len=32)
    if arch == "llama":
        base["n_kv_head"] = 2
    if arch == "gpt2":
        base["bias"] = True
    return build_model(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_cache_decode_matches_full_forward(arch):
    model = _tiny(arch)
    x = torch.randint(0, 97, (2, 24))
    full = model(x)  # (B, T, V)
    cache = model.new_cache(2, 24)
    pieces = [model(x[:, :7], cache)]  # prefill
    pieces += [model(x[:, t : t + 1], cache) for t in range(7, 12)]  # one token at a time
    pieces.append(model(x[:, 12:24], cache))  # a chunk after a cached prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 24


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_embeddings_in_place_of_ids_give_the_same_logits(arch):
    model = _tiny(arch)
    x = torch.randint(0, 97, (2, 24))
    emb = model.embed_tokens(x)
    torch.testing.assert_close(model(None, inputs_embeds=emb), model(x), atol=0, rtol=0)
    cache = model.new_cache(2, 24)
    first = model(None, cache, inputs_embeds=emb[:, :10])  # a prefix of embeddings, cached
    rest = model(x[:, 10:], cache)  # then ids
    torch.testing.assert_close(torch.cat([first, rest], 1), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_future_tokens_do_not_change_past_logits(arch):
    model = _tiny(arch)
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


def test_tied_embeddings_share_one_parameter():
    model = _tiny("llama", tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = _tiny("llama", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_init_scales_residual_projections():
    model = build_model(
        ModelConfig(arch="llama", n_layer=8, n_head=4, d_model=256, vocab_size=1000, init_std=0.02)
    )
    q = model.layers[0].self_attn.q_proj.weight.std().item()
    o = model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q - 0.02) < 0.002
    assert abs(o - 0.02 / 4) < 0.001  # std / sqrt(2·8)


def test_initial_loss_is_near_log_vocab():
    model = _tiny("llama")
    x = torch.randint(0, 97, (4, 32))
    loss = lm_loss(model(x[:, :-1]), x[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.3


def test_learned_positions_refuse_overlong_input():
    model = _tiny("gpt2")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_forward_traces_one_graph_and_matches_eager(arch):
    """`train.compile=true` must not recompile on the second step (a guard on the Python-side
    RoPE cache once did); dynamo's eager backend traces without generating kernels."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=f"tiny-{arch}", n_layer=2))
    compiled = torch.compile(model, backend="eager")
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(3):
        out = compiled(x)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched_tables", [False, True])
def test_rope_backward_is_the_opposite_rotation_bit_for_bit(dtype, batched_tables):
    """apply_rope's custom backward (rotate by −θ, no saved activations) gives exactly the
    gradient autograd computes through the chunk/cat/mul ops in fp32, for (T, D) and
    (B, T, D) tables; for bf16 activations it rounds once, so it is at least as close to
    the float64 gradient."""
    from stoker.models.gpt import _rotate, apply_rope, rope_tables

    B, H, T, D = 2, 3, 5, 8
    positions = torch.arange(T).expand(B, T) if batched_tables else torch.arange(T)
    cos, sin = rope_tables(positions, D, 10000.0)
    x = torch.randn(B, T, H, D).to(dtype).transpose(1, 2).requires_grad_()  # as q/k arrive
    grad = torch.randn(B, H, T, D).to(dtype)
    y = apply_rope(x, cos, sin)
    (gx,) = torch.autograd.grad(y, x, grad)
    c, s = (cos[:, None], sin[:, None]) if batched_tables else (cos, sin)
    y_ref = _rotate(x, c, s)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    if dtype == torch.float32:
        assert torch.equal(gx, gx_ref)
    else:  # autograd rounds to bf16 per op; the rotation rounds once: at least as close
        x64 = x.detach().double().requires_grad_()
        (g64,) = torch.autograd.grad(_rotate(x64, c.double(), s.double()), x64, grad.double())
        ours, ref = (gx.double() - g64).abs().max(), (gx_ref.double() - g64).abs().max()
        assert ours <= ref and ours <= 2**-8 * g64.abs().max()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_fused_projections_decode_the_same_tokens_without_extra_memory(preset):
    """fuse_projections: the layers' weights become views of one matrix per group (no extra
    storage), inference computes the same logits (to GEMM summation order) and greedy tokens;
    with gradients the separate layers run, so training is untouched."""
    from stoker.generate import generate
    from stoker.models.decoding import fuse_projections

    cfg = ModelConfig(preset=preset, **({"qkv_bias": True} if preset == "tiny-llama" else {}))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(prompt)
    tokens = torch.stack(list(generate(model, prompt, 12)), 1)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    fused = fuse_projections(model)
    assert fused == cfg.n_layer * (2 if preset == "tiny-llama" else 1)  # GPT-2: no gate/up
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) < len(storages)
    attn = model.layers[0].self_attn
    assert (
        attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv[0].untyped_storage().data_ptr()
    )
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.stack(list(generate(model, prompt, 12)), 1), tokens)
    loss = lm_loss(model(prompt[:, :-1]), prompt[:, 1:])  # grad mode: the separate layers
    loss.backward()
    assert attn.q_proj.weight.grad is not None
