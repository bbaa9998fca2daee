"""Uptraining a MoR model from a pretrained decoder checkpoint: which layers each shared block
starts from (Bae et al. 2024 §3.1 strategies), and bad input."""

import pytest
import torch

from stoker.api import build_model
from stoker.config import ModelConfig, MoRConfig, RecipeConfig
from stoker.errors import StokerError
from stoker.models.mor_init import source_layers
from stoker.train.checkpoint import save_model_checkpoint


def test_source_layers_per_strategy():
    cycle8 = [0, 1, 2, 3, 0, 1, 2, 3]  # 8 layers, R = 2, cycle
    assert source_layers(8, cycle8, False, "stepwise") == [[0], [2], [5], [7]]
    assert source_layers(8, cycle8, False, "average") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert source_layers(8, cycle8, False, "lower") == [[0], [1], [2], [3]]
    assert source_layers(8, cycle8, False, "upper") == [[4], [5], [6], [7]]
    mid = [0, 1, 2, 1, 2, 3]  # 6 layers, R = 2, middle_cycle
    assert source_layers(6, mid, True, "stepwise") == [[0], [1], [4], [5]]
    assert source_layers(6, mid, True, "average") == [[0], [1, 3], [2, 4], [5]]


@pytest.fixture
def decoder_ckpt(tmp_path):
    cfg = ModelConfig(
        arch="llama",
        n_layer=6,
        n_head=4,
        n_kv_head=2,
        d_model=32,
        d_ff=64,
        vocab_size=97,
        max_seq_len=32,
    )
    torch.manual_seed(0)
    dec = build_model(cfg)
    path = save_model_checkpoint(tmp_path / "dec", dec, RecipeConfig(model=cfg).model_dump())
    return cfg, dec, path


@pytest.mark.parametrize("strategy", ["stepwise", "average"])
def test_uptraining_copies_selected_and_averaged_layers(decoder_ckpt, strategy):
    cfg, dec, path = decoder_ckpt
    mor = MoRConfig(recursions=2, sharing="middle_cycle", init=strategy, init_from=str(path))
    model = build_model(cfg, mor=mor)
    assert torch.equal(model.embed_tokens.weight, dec.embed_tokens.weight)
    assert torch.equal(model.norm.weight, dec.norm.weight)
    srcs = source_layers(6, model.plan, True, strategy)
    for u, block in enumerate(model.layers):
        for name, p in block.named_parameters():
            want = torch.stack([dec.layers[j].get_parameter(name) for j in srcs[u]]).mean(0)
            torch.testing.assert_close(p, want, rtol=0, atol=1e-7)


def test_uptraining_rejects_a_checkpoint_of_another_shape(decoder_ckpt):
    cfg, _, path = decoder_ckpt
    wider = cfg.model_copy(update={"n_layer": 8})
    mor = MoRConfig(recursions=2, init="stepwise", init_from=str(path))
    with pytest.raises(StokerError, match="model.n_layer: checkpoint 6 vs recipe 8"):
        build_model(wider, mor=mor)
    with pytest.raises(StokerError, match="no such run or checkpoint"):
        build_model(cfg, mor=MoRConfig(init="average", init_from=str(path) + "-missing"))
