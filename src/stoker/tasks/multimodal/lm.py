"""Phase 2's data, models and evaluation (task.py runs them as the `lm` and `phase2` stages).

- The vocabulary (chat.py `WordTokenizer`) is built from the training conversations, raw and
  described, so it is a pure function of the data (fingerprinted with it).
- `lm`: the small decoder learns to answer the described conversations ("the image shows
  seven. Which digit is shown?" -> "7"); loss on the answers only.
- `phase2`: the same conversations with the tags, whose slots the projectors fill; greedy
  exact match per instruction type, also with each modality replaced by its missing
  embedding (if the model reads the projected tokens, that modality's questions fail).
Batches pad each micro-batch to its longest row (`phase2.pad: longest`) or to the LM's
`max_seq_len` (`max`, static padding, for comparison); rows are chosen as in data.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker.errors import StokerError
from stoker.tasks.multimodal import chat
from stoker.tasks.multimodal import data as md
from stoker.tasks.multimodal.sources import WORDS

_TOKENIZERS: dict[tuple, chat.WordTokenizer] = {}


def labels_of(cfg) -> dict[str, dict[str, int]]:
    """Each labelled file's label, by its path relative to the data dir's files."""
    out = {}
    for m, name in (("image", cfg.data.images), ("audio", cfg.data.audio)):
        rows = md.read_rows(md.data_path(cfg, name), ("path", "label"))
        out[m] = {r["path"]: int(r["label"]) for r in rows}
    return out


def records(cfg, split: str) -> list[dict]:
    path = md.data_path(cfg, cfg.data.chat_train if split == "train" else cfg.data.chat_test)
    rows = md.read_rows(path, ("messages",))
    for n, r in enumerate(rows, 1):
        chat.check_tags(r, f"{path} line {n}")
    return rows


def described(cfg, rows: list[dict]) -> list[dict]:
    labels = labels_of(cfg)
    files = {"image": cfg.data.images, "audio": cfg.data.audio}
    for r in rows:
        for m in ("image", "audio"):
            if r.get(m) and r[m] not in labels[m]:
                raise StokerError(f"{r[m]} has no label in {files[m]} (the LM's pretraining "
                                  "text names each file's digit)")  # fmt: skip
    return [chat.describe(r, labels, WORDS) for r in rows]


def tokenizer(cfg) -> chat.WordTokenizer:
    """The digits task's word tokenizer, or a pretrained decoder's (`lm.init_from`)."""
    if cfg.multimodal.lm.init_from is not None:
        from stoker.tasks.multimodal.hf_chat import open_chat

        lm = cfg.multimodal.lm
        key = (str(Path(lm.init_from).resolve()), lm.image_token, lm.audio_token)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = open_chat(cfg)
        return _TOKENIZERS[key]
    key = (str(md.data_path(cfg, cfg.data.chat_train).resolve()), cfg.data.images,
           cfg.data.audio)  # fmt: skip
    if key not in _TOKENIZERS:
        rows = records(cfg, "train")
        texts = [m["content"] for r in rows + described(cfg, rows) for m in r["messages"]]
        _TOKENIZERS[key] = chat.WordTokenizer.build(texts)
    return _TOKENIZERS[key]


@dataclass
class Conversations:
    """Rendered samples of one split, their instruction types, and (phase 2) the modality
    tensors of each sample (zeros where absent) with `has_<modality>` flags."""

    samples: list[chat.Sample]
    kinds: list[str]
    tensors: dict[str, torch.Tensor]


def conversations(cfg, split: str, with_media: bool = True) -> Conversations:
    tok, rows = tokenizer(cfg), records(cfg, split)
    path = md.data_path(cfg, cfg.data.chat_train if split == "train" else cfg.data.chat_test)
    kinds = [str(r.get("type", "all")) for r in rows]
    if not with_media:
        samples = [chat.render(tok, d, [], 0, f"{path} line {n}")
                   for n, d in enumerate(described(cfg, rows), 1)]  # fmt: skip
        return Conversations(samples, kinds, {})
    mods, N = cfg.multimodal.modalities, slot_lengths(cfg)
    render = tok.render if hasattr(tok, "render") else lambda *a: chat.render(tok, *a)
    samples = [render(r, mods, N, f"{path} line {n}") for n, r in enumerate(rows, 1)]
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        load = md.load_image if m == "image" else md.load_clip
        items = {i: load(cfg, path.parent, r[m]) for i, r in enumerate(rows) if r.get(m)}
        if not items:
            raise StokerError(f"{path}: no sample has an {m}; phase 2 needs some")
        first = next(iter(items.values()))
        full = np.zeros((len(rows), *first.shape), dtype=np.float32)
        for i, x in items.items():
            if x.shape != first.shape:
                raise StokerError(f"{path}: {rows[i][m]} is {x.shape[::-1]}, other {m} files "
                                  f"are {first.shape[::-1]}; every {m} must have one size")  # fmt: skip
            full[i] = x
        t = torch.from_numpy(full)
        tensors[m] = t[:, None] if m == "image" else t
        tensors[f"has_{m}"] = torch.tensor([bool(r.get(m)) for r in rows])
    return Conversations(samples, kinds, tensors)


def collate(samples: list[chat.Sample], pad_id: int, length: int | None) -> dict[str, Any]:
    """ids / labels padded on the right to the longest row or to `length`."""
    T = max(len(s.ids) for s in samples) if length is None else length
    if any(len(s.ids) > T for s in samples):
        raise StokerError(f"a conversation has {max(len(s.ids) for s in samples)} tokens, more "
                          f"than multimodal.lm.model.max_seq_len={T}; raise it")  # fmt: skip
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), chat.IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    return {"input_ids": ids, "labels": labels}


class ChatBatches(md.Batches):
    """`md.Batches`' rows of the conversations, collated per micro-batch."""

    def __init__(self, conv: Conversations, batch_size: int, seed: int, pad_id: int,
                 length: int | None):  # fmt: skip
        super().__init__({"index": torch.arange(len(conv.samples))}, batch_size, seed)
        self.conv, self.pad_id, self.length = conv, pad_id, length

    def batch(self, step: int, rank: int = 0, world: int = 1, micro: int = 0,
              n_micro: int = 1) -> dict[str, torch.Tensor]:  # fmt: skip
        idx = super().batch(step, rank, world, micro, n_micro)["index"]
        return select(self.conv, idx.tolist(), self.pad_id, self.length)


def select(conv: Conversations, idx: list[int], pad_id: int, length: int | None) -> dict:
    b = collate([conv.samples[i] for i in idx], pad_id, length)
    return b | {k: t[idx] for k, t in conv.tensors.items()}


def build_lm(cfg) -> torch.nn.Module:
    from stoker.models.gpt import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        shape = cfg.multimodal.lm.model.model_copy(update={"vocab_size": tokenizer(cfg).vocab_size})
        return build_model(shape)


_SLOTS: dict[tuple, dict[str, int]] = {}


def slot_lengths(cfg) -> dict[str, int]:
    """Soft tokens per modality slot: `phase2.n_tokens`, or (features: sequence) the length
    of each encoder's feature sequence on the first conversation that has that modality."""
    p2 = cfg.multimodal.phase2
    if p2.features == "pooled":
        return {m: p2.n_tokens for m in cfg.multimodal.modalities}
    from stoker.tasks.multimodal.task import build_encoder

    path = md.data_path(cfg, cfg.data.chat_train)
    key = (str(path.resolve()), cfg.multimodal.model_dump_json())
    if key not in _SLOTS:
        rows, out = records(cfg, "train"), {}
        for m in cfg.multimodal.modalities:
            load = md.load_image if m == "image" else md.load_clip
            first = next((r[m] for r in rows if r.get(m)), None)
            if first is None:
                raise StokerError(f"{path}: no sample has an {m}; phase 2 needs some")
            x = torch.from_numpy(np.asarray(load(cfg, path.parent, first), dtype=np.float32))
            x = x[None, None] if m == "image" else x[None]
            with torch.no_grad():
                out[m] = int(build_encoder(cfg, m).features(x, sequence=True).shape[1])
        _SLOTS[key] = out
    return _SLOTS[key]


def pretrained_lm(cfg) -> torch.nn.Module:
    """`lm.init_from`'s decoder (its weights, dropout 0), checked against its tokenizer."""
    from stoker.tasks.source import load_source_model, open_source

    lm = load_source_model(open_source(cfg.multimodal.lm.init_from, "multimodal.lm.init_from"),
                           "cpu")  # fmt: skip
    tok = tokenizer(cfg)
    if max(tok.tag_ids.values()) >= lm.config.vocab_size:
        raise StokerError(f"multimodal.lm.init_from: a placeholder token's id is outside the "
                          f"model's {lm.config.vocab_size}-token embedding")  # fmt: skip
    return lm


def build_mm(cfg) -> torch.nn.Module:
    """Phase 2's model: phase 1's encoders and aligner and the `lm` stage's decoder, frozen;
    LoRA on the decoder; projectors and missing embeddings drawn from `train.seed`."""
    from stoker.models.lora import apply_lora
    from stoker.models.multimodal import freeze
    from stoker.models.multimodal_lm import MultimodalLM
    from stoker.tasks.multimodal.task import build_align_model, stage_checkpoint
    from stoker.train.checkpoint import load_weights, save_trainable_only

    align = build_align_model(cfg)
    save_trainable_only(align)  # phase 1's checkpoint: the aligner
    load_weights(align, stage_checkpoint(cfg, "phase1", "phase 2"))
    if cfg.multimodal.lm.init_from is not None:
        lm = pretrained_lm(cfg)
    else:
        lm = build_lm(cfg)
        load_weights(lm, stage_checkpoint(cfg, "lm", "phase 2"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 2)
        apply_lora(lm, cfg.lora)  # freezes the rest of the LM
        model = MultimodalLM(align.encoders, freeze(align.aligner), lm,
                             tokenizer(cfg).tag_ids, slot_lengths(cfg),
                             cfg.multimodal.phase2.projector_hidden,
                             cfg.multimodal.phase2.features == "sequence")  # fmt: skip
    return model


@torch.no_grad()
def exact_match(model, conv: Conversations, tok: chat.WordTokenizer, max_new: int, n: int,
                drop: frozenset[str] = frozenset()) -> dict[str, float]:  # fmt: skip
    """% of the first `n` samples whose greedy answer equals the reference, per kind and all."""
    device = next(model.parameters()).device
    hits: dict[str, list[bool]] = {}
    for i in range(min(n, len(conv.samples))):
        s = conv.samples[i]
        b = {k: v.to(device) for k, v in select(conv, [i], tok.pad_id, None).items()}
        if conv.tensors:
            out = model.generate(b, s.prompt_len, max_new, tok.end_id, drop)
        else:
            out = generate_text(model, b["input_ids"][:, : s.prompt_len], max_new, tok.end_id)
        answer = [t for t in s.labels[s.prompt_len :] if t != chat.IGNORE]
        want = answer[: answer.index(tok.end_id)] if tok.end_id in answer else answer
        hits.setdefault(conv.kinds[i], []).append(out == want)
    result = {k: 100.0 * float(np.mean(v)) for k, v in hits.items()}
    result["all"] = 100.0 * float(np.mean([h for v in hits.values() for h in v]))
    return result


def generate_text(lm, prompt: torch.Tensor, max_new: int, end_id: int) -> list[int]:
    cache = lm.new_cache(1, prompt.shape[1] + max_new)
    logits, out = lm(prompt, cache), []
    for _ in range(max_new):
        nxt = int(logits[0, -1].argmax())
        if nxt == end_id:
            break
        out.append(nxt)
        logits = lm(torch.tensor([[nxt]], device=prompt.device), cache)
    return out
