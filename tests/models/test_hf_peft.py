"""PEFT interop (models/hf_peft.py) against `peft` itself: our adapters exported as a PEFT
directory load with `PeftModel.from_pretrained` onto the transformers base model and give our
logits; adapters trained by PEFT's own `get_peft_model` import onto our model and give PEFT's
logits (float32, CPU, atol = rtol = 1e-5); per-module ranks and alphas and rsLoRA carry over;
what has no exact PEFT form is one StokerError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

try:
    import peft
    import transformers
except ImportError as e:  # the dev extra installs both: a broken install fails, never skips
    pytest.fail(
        f"PEFT parity needs peft and transformers (pip install -e '.[dev]'): {e}", pytrace=False
    )

from stoker.config import LoRAConfig, ModelConfig, MoRConfig  # noqa: E402
from stoker.errors import StokerError  # noqa: E402
from stoker.models.gpt import build_model  # noqa: E402
from stoker.models.hf import load_hf_model  # noqa: E402
from stoker.models.hf_peft import export_peft, import_peft  # noqa: E402
from stoker.models.lora import apply_lora, lora_layers, lora_state_dict  # noqa: E402
from stoker.models.lora_mixture import apply_lora_mixture  # noqa: E402
from stoker.models.mor import build_mor  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
V, B, T = 96, 2, 12
SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
CASES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
}


def build_hf(name: str) -> torch.nn.Module:
    cls, kw = CASES[name]
    cfg = getattr(transformers, cls)(vocab_size=V, **SHAPE, **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # biases and norm weights off their 0/1 init
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def base_dir(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    build_hf(request.param).save_pretrained(path)
    return path


def hf_base(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


def ids() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


def randomize(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.copy_(0.3 * torch.randn(m.lora_A.shape, generator=gen))
            m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=gen))


LORA = {
    "q,v": LoRAConfig(),
    "all-linear,ranks,rslora": LoRAConfig(
        targets="all-linear",
        r=4,
        alpha=6,
        rslora=True,
        ranks={"layers.1.self_attn.v_proj": 2, "mlp.*": 3},
    ),
    "one-layer": LoRAConfig(targets=["layers.1.*"], r=2, dropout=0.1),
}


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("lora", list(LORA))
def test_exported_adapter_loads_in_peft_with_our_logits(base_dir, lora, tmp_path):
    ours = load_hf_model(base_dir)
    names = apply_lora(ours, LORA[lora])
    randomize(ours)
    out = export_peft(ours, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["bias"]) == (
        "LORA",
        "CAUSAL_LM",
        "none",
    )
    theirs = peft.PeftModel.from_pretrained(hf_base(base_dir), out).eval()
    adapted = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert adapted == [f"base_model.model.model.{n}" for n in names]  # exactly our layers
    with torch.no_grad():
        assert_close(ours(ids()), theirs(ids()).logits, **TOL)
        assert not torch.allclose(theirs(ids()).logits, hf_base(base_dir)(ids()).logits, atol=1e-3)


def test_per_module_ranks_become_peft_rank_pattern(base_dir, tmp_path):
    ours = load_hf_model(base_dir)
    apply_lora(ours, LORA["all-linear,ranks,rslora"])
    config = json.loads((export_peft(ours, tmp_path) / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 6.0, True)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["rank_pattern"] == {
        r"model\.layers\.1\.self_attn\.v_proj": 2,
        "gate_proj": 3,
        "up_proj": 3,
        "down_proj": 3,
    }
    assert config["alpha_pattern"] == {}


def test_peft_trained_adapter_imports_with_peft_logits(base_dir, tmp_path):
    torch.manual_seed(3)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 4},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(hf_base(base_dir), cfg).eval()  # random A and B
    theirs.save_pretrained(tmp_path)
    ours = load_hf_model(base_dir)
    names = import_peft(ours, tmp_path)
    assert len(names) == 6 and all(not n.startswith("model.") for n in names)
    layers = lora_layers(ours)
    assert (
        layers["layers.0.mlp.down_proj"].r == 2 and layers["layers.1.self_attn.v_proj"].scale == 1
    )
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")
    ]
    with torch.no_grad():
        assert_close(ours(ids()), theirs(ids()).logits, **TOL)


def test_export_then_import_round_trips_bit_for_bit(base_dir, tmp_path):
    ours = load_hf_model(base_dir)
    apply_lora(ours, LORA["all-linear,ranks,rslora"])
    randomize(ours)
    export_peft(ours, tmp_path)
    back = load_hf_model(base_dir)
    import_peft(back, tmp_path)
    a, b = lora_state_dict(ours), lora_state_dict(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: m.scale for n, m in lora_layers(ours).items()} == {
        n: m.scale for n, m in lora_layers(back).items()
    }


# ----------------------------------------------------------------------------- bad input
SMALL = dict(n_layer=2, n_head=4, d_model=32, vocab_size=V, max_seq_len=32)


def test_models_without_an_exact_peft_form_are_refused(tmp_path):
    gpt2 = build_model(ModelConfig(arch="gpt2", bias=True, **SMALL))
    apply_lora(gpt2, LoRAConfig())
    with pytest.raises(StokerError, match="fuses q/k/v"):
        export_peft(gpt2, tmp_path)
    mor = build_mor(ModelConfig(**{**SMALL, "n_layer": 4}), MoRConfig(sharing="cycle"))
    apply_lora(mor, LoRAConfig())
    with pytest.raises(StokerError, match="Mixture-of-Recursions"):
        export_peft(mor, tmp_path)
    mixed = build_model(ModelConfig(**SMALL))
    apply_lora_mixture(mixed, [2, 2])
    with pytest.raises(StokerError, match="per-example gates"):
        export_peft(mixed, tmp_path)
    with pytest.raises(StokerError, match="no LoRA layers"):
        export_peft(build_model(ModelConfig(**SMALL)), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def write_adapter(path: Path, config: dict, weights: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(path / "adapter_model.safetensors"))
    return path


def test_bad_adapter_directories_are_one_line_errors(tmp_path):
    model = build_model(ModelConfig(**SMALL))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    good = {key.format("A"): torch.zeros(2, 32), key.format("B"): torch.zeros(32, 2)}
    lora = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    cases = [
        (None, None, "has no adapter_config.json"),
        ({"peft_type": "IA3"}, good, "only LORA"),
        ({**lora, "use_dora": True}, good, "use_dora"),
        ({**lora, "bias": "all"}, good, "bias='all'"),
        ({**lora, "modules_to_save": ["lm_head"]}, good, "modules_to_save"),
        (lora, None, "has no adapter_model.safetensors"),
        (
            lora,
            {
                **good,
                "base_model.model.model.layers.0.attn.c_attn.lora_A.weight": torch.zeros(2, 32),
            },
            "names no linear layer",
        ),
        (lora, {key.format("A"): torch.zeros(2, 32)}, "missing lora_A/lora_B"),
        (
            lora,
            {key.format("A"): torch.zeros(2, 16), key.format("B"): torch.zeros(32, 2)},
            "do not fit",
        ),
    ]
    for i, (config, weights, match) in enumerate(cases):
        d = tmp_path / str(i)
        if config is None:
            d.mkdir()
        else:
            write_adapter(d, config, weights)
        with pytest.raises(StokerError, match=match) as e:
            import_peft(model, d)
        assert "\n" not in str(e.value)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04")
    write_adapter(tmp_path / "pickle", lora)
    with pytest.raises(StokerError, match="only safetensors"):
        import_peft(model, tmp_path / "pickle")
    assert not lora_layers(model)  # no failed import changed the model
    import_peft(model, write_adapter(tmp_path / "ok", lora, good))
    with pytest.raises(StokerError, match="already has a LoRA adapter"):
        import_peft(model, tmp_path / "ok")
