"""Mixture-of-Recursions language models (Bae et al. 2025, "Mixture-of-Recursions: Learning
Dynamic Recursive Depths for Adaptive Token-Level Computation", arXiv 2507.10524).

Built from `models/gpt.py`'s decoder: `MoRDecoder` is a `Decoder` whose `layers` hold only the
unique blocks; `plan` maps each of the `model.n_layer` applied layers to one of them.
- Parameter sharing (§2.1; docs/mor.md) for N layers and R recursions: `cycle` (applied
  layer i + r·B uses block i), `sequence` (layers i·R … i·R+R−1 use block i), `middle_cycle`
  and `middle_sequence` (first and last layers unique, the N−2 between shared as above).
  Sharing is real tying: one `Block`, so attention, MLP and norms are the same Parameters.
- Recursive baseline (`router: none`): the shared block applied R times to every token.
- Expert-choice routing (§2.2.1): per recursion r a `Linear(d, 1)` router, gate
  g = α·sigmoid(logit); recursion r keeps the top k_r = ⌊(R−r)·T/R⌋ of the tokens still active
  (hierarchical), sorted by position, and runs the block on that compacted subsequence with
  RoPE at the original positions; selected tokens become h + g·F(h) (F the shared block
  stack, residuals included), unselected ones are untouched. Auxiliary loss: BCE(logit,
  selected) summed over recursions × `aux_loss_coeff`.
- Token-choice routing (§2.2.2): one `Linear(d, R)` on the stack's input (the first layer's
  output under middle_* sharing), softmax, top-1 depth d per token; the token passes d
  recursions and leaves as h + p_d·F^d(h). Balancing loss + z-loss, or loss-free bias
  balancing (Wang et al. 2024) with `bias_balance_rate`.
- KV caching (§2.3): `recursion` (attention among the tokens active in that recursion) or
  `shared` (recursions ≥ 1 reuse recursion 0's keys/values of the same layer).
- Causal decoding (not in the paper's code): top-k over a sequence is not causal, so with a
  cache (and with `threshold_routing`) expert-choice keeps a token in recursion r ≥ 1 when
  sigmoid(logit) > 0.5 (what the BCE loss trains for); token-choice is causal as is.
- With R = 1 there is nothing to route (capacity 1, one depth): no routers, the plain stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from stoker.config import ModelConfig, MoRConfig
from stoker.errors import StokerError
from stoker.models.gpt import Decoder, Rope, init_weights, lm_loss
from stoker.models.mor_routing import (
    KVRecorder,
    MoRCache,
    RowCache,
    RowLayerCache,
    balance_loss,
    capacity,
    compact,
    expert_bce,
    gather_rope,
    gather_tokens,
    shared_kv_block,
    z_loss,
)


def sharing_plan(n_layer: int, recursions: int, sharing: str) -> list[int]:
    """The unique block each applied layer uses (blocks numbered in first-use order)."""
    middle = sharing.startswith("middle")
    shared = n_layer - 2 if middle else n_layer
    if shared <= 0 or shared % recursions:
        raise StokerError(
            f"{sharing} sharing needs {'n_layer-2' if middle else 'n_layer'}="
            f"{shared} divisible by recursions={recursions}"
        )
    B = shared // recursions
    if sharing.endswith("cycle"):
        inner = [j % B for j in range(shared)]
    else:
        inner = [j // recursions for j in range(shared)]
    return [0, *(1 + u for u in inner), B + 1] if middle else inner


@dataclass
class _Pass:
    """One forward's context: RoPE tables and positions of its tokens, the row cache (decoding),
    the routing mode, and recursion 0's keys/values per block slot (KV sharing)."""

    rope: Rope | None
    pos: torch.Tensor  # (T,)
    row: RowCache | None
    threshold: bool
    kv0: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def cache(self, j: int) -> RowLayerCache | None:
        return self.row.layer(j) if self.row is not None else None


class MoRDecoder(Decoder):
    """A decoder whose `n_layer` applied layers share `len(layers)` unique blocks, with
    per-token recursion depth chosen by a router (see the module docstring)."""

    takes_targets = False  # forward returns logits only

    def __init__(self, cfg: ModelConfig, mor: MoRConfig):
        plan = sharing_plan(cfg.n_layer, mor.recursions, mor.sharing)
        super().__init__(cfg.model_copy(update={"n_layer": max(plan) + 1}))
        self.config, self.mor, self.plan = cfg, mor, plan
        R = mor.recursions
        self.recursions = R
        self.n_edge = 1 if mor.sharing.startswith("middle") else 0  # unique first/last layers
        self.block_size = (cfg.n_layer - 2 * self.n_edge) // R
        self.router = mor.router if R > 1 else "none"
        self.plain = (
            self.router == "none"
            and (mor.kv_cache == "recursion" or R == 1)
            and (mor.baseline_gate is None or R == 1)
        )
        C = cfg.d_model
        hidden = mor.router_hidden
        if self.router == "expert":
            self.routers = nn.ModuleList(make_router(C, 1, hidden) for _ in range(R))
        elif self.router == "token":
            self.routers = nn.ModuleList([make_router(C, R, hidden)])
            if mor.bias_balance_rate > 0:
                self.register_buffer("router_bias", torch.zeros(R))
        self.threshold_routing = False  # no-cache forwards: False = training-time top-k
        self._aux: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] = {}
        self.last_depth: torch.Tensor | None = None  # (B, T) recursions each token went through
        self.last_selected: list[torch.Tensor] = []  # per recursion (B, T): tokens it processed

    # ------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, cache: MoRCache | None = None) -> torch.Tensor:
        """Logits (B, T, V). With a `MoRCache`, the ids continue the cached positions and
        routing is causal (threshold); rows are decoded one at a time (own active sets)."""
        if cache is None:
            return self._forward(input_ids, None, self.threshold_routing)
        logits, depths = [], []
        for b, row in enumerate(cache.rows):
            logits.append(self._forward(input_ids[b : b + 1], row, True))
            depths.append(self.last_depth)
        self.last_depth = torch.cat(depths)
        return torch.cat(logits)  # (B, T, V)

    def _forward(self, ids: torch.Tensor, row: RowCache | None, threshold: bool) -> torch.Tensor:
        B, T = ids.shape
        start = row.length if row is not None else 0
        pos = torch.arange(start, start + T, device=ids.device)
        x, rope = self.embed(ids, pos)  # (B, T, C)
        p = _Pass(rope, pos, row, threshold)
        self._aux, self._stats, self.last_selected = x.new_zeros((), dtype=torch.float32), {}, []
        self.last_depth = torch.full((B, T), self.recursions, device=ids.device)
        if self.plain:
            for j, u in enumerate(self.plan):
                x = self.layers[u](x, rope, p.cache(j))  # (B, T, C)
        else:
            for j in range(self.n_edge):
                x = self.layers[self.plan[j]](x, rope, p.cache(j))
            if self.router == "expert":
                x = self._expert(x, p)
            elif self.router == "token":
                x = self._token(x, p)
            else:
                c = self.mor.baseline_gate
                update = (lambda x, y, idx: y) if c is None else (lambda x, y, idx: x + c * y)
                for r in range(self.recursions):
                    x = self._run_block(r, x, None, p, update)
            for j in range(len(self.plan) - self.n_edge, len(self.plan)):
                x = self.layers[self.plan[j]](x, rope, p.cache(j))
        if row is not None:
            row.length += T
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _apply_recursion(
        self, r: int, x: torch.Tensor, rope: Rope | None, q_pos: torch.Tensor, p: _Pass
    ) -> torch.Tensor:
        """F(x): recursion r's pass through the shared block stack, x (B, n, C) at positions
        q_pos (B, n)."""
        shared = self.mor.kv_cache == "shared"
        for i in range(self.block_size):
            j = self.n_edge + r * self.block_size + i  # applied layer
            layer = self.layers[self.plan[j]]
            if shared and r > 0:
                x = shared_kv_block(layer, x, rope, *p.kv0[i], q_pos)
            elif shared:
                rec = KVRecorder(p.cache(j))
                x = layer(x, rope, rec)
                p.kv0[i] = (rec.k, rec.v)
            else:
                x = layer(x, rope, p.cache(j))  # (B, n, C)
        return x

    def _run_block(
        self,
        r: int,
        h: torch.Tensor,
        sel: torch.Tensor | None,
        p: _Pass,
        combine,
        n: int | None = None,
    ) -> torch.Tensor:
        """Recursion r on the tokens `sel` (B, T) marks (None: all; `n` per row when every row
        has as many): the block runs on the position-sorted compacted subsequence,
        `combine(x, F(x), idx)` gives the selected tokens' new states, every other token is
        left bitwise unchanged."""
        B, T, C = h.shape
        if sel is None:
            y = self._apply_recursion(r, h, p.rope, p.pos.expand(B, T), p)
            return combine(h, y, None)
        idx, valid = compact(sel, n)  # (B, n), (B, n)
        if idx.shape[1] == 0:
            return h
        x = gather_tokens(h, idx)  # (B, n, C)
        y = self._apply_recursion(r, x, gather_rope(p.rope, idx), p.pos[idx], p)  # (B, n, C)
        new = torch.where(valid[..., None], combine(x, y, idx), x)  # padding keeps its value
        return h.scatter(1, idx[..., None].expand(-1, -1, C), new)  # (B, T, C)

    # ------------------------------------------------------------------------------ routers
    def _expert(self, h: torch.Tensor, p: _Pass) -> torch.Tensor:
        """Expert-choice recursions: top-k (training) or threshold (causal) selection."""
        B, T, C = h.shape
        R, stats = self.recursions, self._stats
        active = None  # (B, T) tokens still in the recursion; None = all
        depth = torch.ones((B, T), dtype=torch.long, device=h.device)
        for r in range(R):
            logit = self.routers[r](h).squeeze(-1).float()  # (B, T)
            sel, k = None, None  # recursion 0 keeps all T tokens: there is no choice to make
            if r > 0 and p.threshold:
                sel = torch.sigmoid(logit) > 0.5
                sel = sel if active is None else sel & active
            elif r > 0:
                cand = logit if active is None else logit.masked_fill(~active, float("-inf"))
                k = capacity(R, r, T)
                top = cand.topk(k, dim=1).indices  # (B, k)
                sel = torch.zeros_like(cand, dtype=torch.bool).scatter(1, top, True)
                agree = (torch.sigmoid(logit) > 0.5) == sel
                stats[f"mor_agree_r{r}"] = _masked_mean(agree, active)
            bce = expert_bce(logit, active, sel)
            self._aux = self._aux + self.mor.aux_loss_coeff * bce
            gate = (self.mor.alpha * torch.sigmoid(logit)).to(h.dtype)  # (B, T)

            def gated(x, y, idx, gate=gate):
                g = gate if idx is None else gate.gather(1, idx)  # (B, n)
                return x + g[..., None] * y

            h = self._run_block(r, h, sel, p, gated, k)
            self.last_selected.append(
                torch.ones_like(depth, dtype=torch.bool) if sel is None else sel
            )
            if sel is not None:  # recursion 0 processes every token
                stats[f"mor_sel_r{r}"] = sel.float().mean()
            stats[f"mor_gate_r{r}"] = _masked_mean(gate.detach(), sel)
            stats["mor_aux_bce"] = stats.get("mor_aux_bce", 0.0) + bce.detach()
            if sel is not None:
                depth += sel
                active = sel
        if active is not None:
            stats["mor_dead"] = (~active.any(dim=0)).float().mean()
        self.last_depth = depth
        return h

    def _token(self, h: torch.Tensor, p: _Pass) -> torch.Tensor:
        """Token-choice recursions: each token's depth is the router's top-1 choice."""
        R = self.recursions
        logits = self.routers[0](h).float()  # (B, T, R)
        probs = logits.softmax(dim=-1)
        bias = getattr(self, "router_bias", None)
        choice = (probs if bias is None else probs + bias).argmax(dim=-1)  # (B, T), depth − 1
        w = probs.gather(-1, choice[..., None]).to(h.dtype)  # (B, T, 1)
        h0 = h
        for r in range(R):
            h = self._run_block(r, h, None if r == 0 else choice >= r, p, lambda x, y, idx: y)
            self.last_selected.append(choice >= r)
        bal, z = balance_loss(probs, choice), z_loss(logits)
        self._aux = self._aux + self.mor.balance_coeff * bal + self.mor.z_loss_coeff * z
        if bias is not None and self.training:  # loss-free balancing: nudge under-used depths up
            with torch.no_grad():
                load = torch.bincount(choice.flatten(), minlength=R).float()
                bias += self.mor.bias_balance_rate * torch.sign(load.mean() - load)
        s = self._stats
        for r in range(1, R):
            s[f"mor_sel_r{r}"] = (choice >= r).float().mean()
        s["mor_gate"], s["mor_balance"], s["mor_z"] = w.detach().mean(), bal.detach(), z.detach()
        self.last_depth = choice + 1
        s["mor_dead"] = (~(choice == R - 1).any(dim=0)).float().mean()
        return h0 + w * h  # (B, T, C)

    # ------------------------------------------------------------------------ loop hooks
    def auxiliary_loss(self) -> torch.Tensor:
        """The router losses of the last forward (0 for the recursive baseline)."""
        return self._aux if self._aux is not None else torch.zeros(())

    def telemetry(self) -> dict[str, float]:
        """Routing statistics of the last forward: selected fraction and mean gate per
        recursion, auxiliary losses, agreement of threshold with top-k routing, dead tokens
        (positions no row sends to the last recursion)."""
        return {k: float(v) for k, v in self._stats.items()}

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> MoRCache:
        p, cfg = self.embed_tokens.weight, self.config
        rows = [
            RowCache(
                len(self.plan),
                cfg.kv_heads,
                cfg.dim_head,
                max_len or cfg.max_seq_len,
                p.device,
                dtype or p.dtype,
            )
            for _ in range(batch)
        ]
        return MoRCache(rows)

    @torch.no_grad()
    def evaluate_routing(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Training-time top-k routing vs causal threshold routing on one batch: both losses,
        per-recursion decision agreement (same hidden states) and per-token depth agreement."""
        if self.router == "none":
            return {}
        was = self.threshold_routing
        try:
            self.threshold_routing = False
            loss_topk = float(lm_loss(self(x), y))
            agree = {k: float(v) for k, v in self._stats.items() if k.startswith("mor_agree")}
            depth_topk = self.last_depth
            self.threshold_routing = True
            loss_thr = float(lm_loss(self(x), y))
        finally:
            self.threshold_routing = was
        same = float((depth_topk == self.last_depth).float().mean())
        return {
            "loss_topk": loss_topk,
            "loss_threshold": loss_thr,
            "depth_agreement": same,
            **agree,
        }


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `x` over the True entries of `mask` (all entries when None), without a sync."""
    if mask is None:
        return x.float().mean()
    return (x.float() * mask).sum() / mask.sum().clamp(min=1)


def make_router(d_model: int, out: int, hidden: int = 0) -> nn.Module:
    """A router: Linear(d, out), or with `hidden` > 0 the MLP router of the MoR paper,
    Linear(d, hidden) → GELU → Linear(hidden, out); no biases (a per-token score's bias
    cannot change a top-k choice)."""
    if hidden == 0:
        return nn.Linear(d_model, out, bias=False)
    return nn.Sequential(
        nn.Linear(d_model, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out, bias=False)
    )


def build_mor(
    cfg: ModelConfig, mor: MoRConfig, device: str | torch.device | None = None
) -> MoRDecoder:
    """A freshly initialized MoR model; `device="meta"` builds shapes only (for counting)."""
    with torch.device(device or "cpu"):
        model = MoRDecoder(cfg, mor)
    if str(device) != "meta":
        init_weights(model, cfg.init_std, cfg.n_layer)
    return model
