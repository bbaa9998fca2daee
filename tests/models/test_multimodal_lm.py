"""models/multimodal_lm.py: the projector's shapes, splicing in place of the placeholders, the
missing embedding chosen per sample in a mixed batch, and cached greedy decoding that equals
the full forward's argmax."""

from __future__ import annotations

import torch

from stoker.config import ModelConfig
from stoker.models.gpt import build_model
from stoker.models.multimodal import Aligner, ImageCNN, freeze
from stoker.models.multimodal_lm import MultimodalLM, Projector

IMG = 5  # the placeholder id


def tiny(n_tokens: int = 3) -> MultimodalLM:
    torch.manual_seed(0)
    enc = freeze(ImageCNN(widths=(4,), n_classes=2))
    aligner = freeze(Aligner({"image": 4, "audio": 4}, dim=6))
    lm = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=20, max_seq_len=32))
    return MultimodalLM(torch.nn.ModuleDict({"image": enc}), aligner, lm, {"image": IMG},
                        n_tokens).eval()  # fmt: skip


def test_projector_gives_n_tokens_or_one_per_item():
    p = Projector(6, 16, 4)
    assert p(torch.randn(2, 6)).shape == (2, 4, 16)
    assert Projector(6, 16, 4, sequence=True)(torch.randn(2, 9, 6)).shape == (2, 9, 16)


def test_a_mixed_batch_gets_features_or_the_missing_embedding_per_sample():
    m = tiny()
    ids = torch.tensor(
        [[1, IMG, IMG, IMG, 7, 8], [1, 2, IMG, IMG, IMG, 9], [IMG, IMG, IMG, 3, 4, 6]]
    )
    images = torch.randn(3, 1, 8, 8)
    batch = {"input_ids": ids, "image": images, "has_image": torch.tensor([True, False, True])}
    x = m.embed(batch)
    slots = ids == IMG
    alone = [m.modality_tokens({"image": images[i : i + 1], "has_image": torch.tensor([True])})
             ["image"][0] for i in range(3)]  # fmt: skip
    torch.testing.assert_close(x[0][slots[0]], alone[0])  # its own image's tokens
    torch.testing.assert_close(x[2][slots[2]], alone[2])
    torch.testing.assert_close(x[1][slots[1]], m.missing["image"].detach())  # no image: missing
    assert not torch.allclose(alone[0], alone[2])  # different images, different tokens
    text = m.lm.embed_tokens(ids)
    torch.testing.assert_close(x[~slots], text[~slots])  # every other position untouched
    dropped = m.embed(batch, drop=frozenset({"image"}))
    for i in range(3):  # the ablation: every sample gets the missing embedding
        torch.testing.assert_close(dropped[i][slots[i]], m.missing["image"].detach())


def test_cached_greedy_equals_the_argmax_of_full_forwards():
    m = tiny()
    ids = torch.tensor([[1, IMG, IMG, IMG, 7]])
    batch = {"input_ids": ids, "image": torch.randn(1, 1, 8, 8), "has_image": torch.tensor([True])}
    out = m.generate(batch, 5, 6, end_id=-1)
    seq = ids
    for t in out:
        full = m({**batch, "input_ids": seq})
        assert int(full[0, -1].argmax()) == t
        seq = torch.cat([seq, torch.tensor([[t]])], 1)
    assert len(out) == 6


def test_sequence_features_give_one_token_per_grid_cell_each_from_its_own_cell():
    torch.manual_seed(0)
    enc = freeze(ImageCNN(widths=(4,), n_classes=2))  # 8x8 -> one pool -> a 4x4 grid: 16 items
    aligner = freeze(Aligner({"image": 4, "audio": 4}, dim=6))
    lm = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=20, max_seq_len=40))
    m = MultimodalLM(torch.nn.ModuleDict({"image": enc}), aligner, lm, {"image": IMG},
                     {"image": 16}, sequence=True).eval()  # fmt: skip
    assert m.missing["image"].shape == (16, 16)
    images = torch.randn(2, 1, 8, 8)
    tokens = m.modality_tokens({"image": images, "has_image": torch.tensor([True, False])})["image"]
    assert tokens.shape == (2, 16, 16)
    grid = enc.features(images, sequence=True)  # (2, 16, 4): cell i -> token i
    item = torch.nn.functional.normalize(aligner.proj["image"](grid), dim=-1)
    torch.testing.assert_close(tokens[0], m.projectors["image"](item)[0])
    torch.testing.assert_close(tokens[1], m.missing["image"].detach())  # per sample
    ids = torch.tensor([[1] + [IMG] * 16 + [7, 8]])
    assert m({"input_ids": ids, "image": images[:1], "has_image": torch.tensor([True])}).shape \
        == (1, 19, 20)  # fmt: skip
