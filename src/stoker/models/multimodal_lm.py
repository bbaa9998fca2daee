"""Phase 2's model: frozen encoders and aligner, a projector per modality into the language
model's hidden size, a learned missing-modality embedding per modality, and a decoder LM
(models/gpt.py) with LoRA adapters.

- `Projector` (LLaVA's `mlp2x_gelu`, Liu et al. 2023): Linear -> GELU -> Linear. A pooled
  feature (B, D) becomes `n_tokens` soft tokens (B, N, C) (the second linear gives N·C); a
  feature sequence (B, L, D) becomes one token per item (B, L, C).
- Splicing (LLaVA / nanoVLM): the ids hold `n_tokens` placeholder ids per modality slot
  (tasks/multimodal/chat.py); their embeddings are replaced in place by the projector's tokens
  for samples that have that modality and by the missing embedding (N, C) for those that do
  not — chosen per sample from `has_<modality>`, never per batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """`in_dim` -> `mid` (default: `hidden`) -> GELU -> `n_tokens` tokens of size `hidden`."""

    def __init__(self, in_dim: int, hidden: int, n_tokens: int, sequence: bool = False,
                 mid: int | None = None):  # fmt: skip
        super().__init__()
        self.n_tokens, self.hidden, self.sequence = n_tokens, hidden, sequence
        mid = mid or hidden
        out = hidden if sequence else hidden * n_tokens
        self.net = nn.Sequential(nn.Linear(in_dim, mid), nn.GELU(), nn.Linear(mid, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence:
            return self.net(x)  # (B, L, C)
        return self.net(x).view(len(x), self.n_tokens, self.hidden)  # (B, N, C)


class MultimodalLM(nn.Module):
    """`encoders` and `aligner` frozen by the caller; `lm` a Decoder (LoRA applied by the
    caller); `tag_ids` the placeholder id of each modality."""

    def __init__(self, encoders: nn.ModuleDict, aligner: nn.Module, lm: nn.Module,
                 tag_ids: dict[str, int], n_tokens: int | dict[str, int], mid: int | None = None,
                 sequence: bool = False):  # fmt: skip
        """`n_tokens`: soft tokens per modality slot (a dict: per modality); `sequence`: the
        encoders' feature sequences (patches / frames), one token per item, each item in the
        aligner's space (its per-modality projection, L2-normalised), instead of the pooled
        embedding projected to `n_tokens` tokens. Then `n_tokens[m]` is the sequence length."""
        super().__init__()
        self.encoders, self.aligner, self.lm = encoders, aligner, lm
        n = n_tokens if isinstance(n_tokens, dict) else {m: n_tokens for m in encoders}
        self.tag_ids, self.n_tokens, self.sequence = dict(tag_ids), dict(n), sequence
        C = lm.config.d_model
        self.projectors = nn.ModuleDict(
            {m: Projector(aligner.dim, C, n[m], sequence, mid=mid) for m in encoders}
        )
        self.missing = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(n[m], C) * lm.config.init_std) for m in encoders}
        )

    def _aligned(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled, or (B, L, D) per item, in the frozen aligner's space."""
        with torch.no_grad():
            feats = self.encoders[m].features(x, sequence=self.sequence)
            if not self.sequence:
                return self.aligner.embed(m, feats)
            return F.normalize(self.aligner.proj[m](feats), dim=-1)  # (B, L, D)

    def modality_tokens(self, batch: dict[str, torch.Tensor], drop: frozenset[str] = frozenset()
                        ) -> dict[str, torch.Tensor]:  # fmt: skip
        """(B, N, C) per modality: projected features where the sample has the modality (and
        it is not in `drop`), else the missing embedding."""
        out = {}
        for m in self.encoders:
            has = batch[f"has_{m}"].bool()
            if m in drop:
                has = torch.zeros_like(has)
            tokens = self.projectors[m](self._aligned(m, batch[m]))  # (B, N, C)
            if tokens.shape[1] != self.n_tokens[m]:
                raise ValueError(f"{m} gives {tokens.shape[1]} tokens, its slot holds "
                                 f"{self.n_tokens[m]}")  # fmt: skip
            missing = self.missing[m].to(tokens.dtype)[None].expand_as(tokens)
            out[m] = torch.where(has[:, None, None], tokens, missing)
        return out

    def embed(self, batch: dict[str, torch.Tensor], drop: frozenset[str] = frozenset()
              ) -> torch.Tensor:  # fmt: skip
        """The LM's input embeddings (B, T, C) with every slot filled."""
        ids = batch["input_ids"]
        x = self.lm.embed_tokens(ids)
        for m, tokens in self.modality_tokens(batch, drop).items():
            slot = ids == self.tag_ids[m]  # (B, T): n_tokens positions in every row
            if not bool((slot.sum(1) == self.n_tokens[m]).all()):
                raise ValueError(f"every row needs {self.n_tokens[m]} {m} placeholder positions")
            x = x.masked_scatter(slot[..., None], tokens.to(x.dtype))
        return x

    def forward(self, batch: dict[str, torch.Tensor], drop: frozenset[str] = frozenset()
                ) -> torch.Tensor:  # fmt: skip
        return self.lm(None, inputs_embeds=self.embed(batch, drop))  # (B, T, V)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], prompt_len: int, max_new_tokens: int,
                 end_id: int, drop: frozenset[str] = frozenset()) -> list[int]:  # fmt: skip
        """Greedy answer of the single sample in `batch` (its first `prompt_len` ids)."""
        prompt = {k: v[:1] for k, v in batch.items()}
        prompt["input_ids"] = prompt["input_ids"][:, :prompt_len]
        cache = self.lm.new_cache(1, prompt_len + max_new_tokens)
        logits = self.lm(None, cache, inputs_embeds=self.embed(prompt, drop))
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt == end_id:
                break
            out.append(nxt)
            logits = self.lm(torch.tensor([[nxt]], device=logits.device), cache)
        return out
