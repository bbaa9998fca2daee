"""Sequence-to-sequence generation on a bidirectional encoder, UniLM-style.

UniLM (Dong et al. 2019, "Unified Language Model Pre-training", arXiv 1905.03197, §2.3) turns
a BERT encoder into a conditional generator with nothing but a self-attention mask. The input is
`[CLS] source [SEP] target [SEP]`; the source part (with [CLS] and the first [SEP]) attends to
itself bidirectionally and never to the target; each target position attends to the whole
source and to target positions at or before itself. Token type ids are 0 on the source part and
`target_type` (1 for BERT; 0 for RoBERTa, which has one type) on the target part.

Training is causal over the target: the hidden state at position i predicts token i+1, for i
from the first [SEP] (it predicts the target's first token) to the position before the final
[SEP] (it predicts the final [SEP], the end token). `encode_seq2seq` builds those labels,
`collate_seq2seq` pads them and builds the mask (`seq2seq_mask`); `padding_mask` is the plain
bidirectional mask of classification/QA rows that share a batch with seq2seq rows. Pad queries
always see the source, so `F.scaled_dot_product_attention` never gets an all-masked row (NaN).

Generation (`generate`: greedy, or beam search ranking finished hypotheses by summed log-prob
/ length**length_penalty, as `transformers` does). Under the mask an earlier position's output
never depends on later tokens, so recomputing the whole sequence each step is exact, and so is
a key/value cache: `cached_greedy_search` encodes each `[CLS] source [SEP]` once and then feeds
one token per row per step (what `generate` uses for greedy when given a `step_fn`; beam search
recomputes).

Code through an uncased WordPiece vocabulary that has no newline or indent tokens
(`code_to_text` / `text_to_code`): newlines and leading indentation levels become three of
BERT's `[unusedN]` tokens, registered on the tokenizer by `register_code_tokens` so they are
matched whole in raw text. WordPiece decoding puts a space between every two pieces
(`my_var` -> `my _ var`, `**` -> `* *`, `1.5` -> `1. 5`); `text_to_code` glues back the pairs
whose spacing Python cares about, and `code_to_text` marks with a third token (`space`) the
few places where the original had a space that the gluing would remove (`for _ in`); the
keywords the lower-casing folds (`none`, `true`, `false`) are capitalized back. Spacing inside
strings and comments is not kept. Indentation is counted in 4-space (or tab) levels.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import torch

from stoker.errors import StokerError

IGNORE = -100  # label of positions that predict nothing (cross-entropy's ignore_index)
NEWLINE, INDENT, SPACE = "[unused0]", "[unused1]", "[unused2]"
CODE_TOKENS = (NEWLINE, INDENT, SPACE)

# logits_fn(input_ids (N, T), token_type_ids (N, T), mask (N, T, T), rows (N,)) -> (N, T, V)
LogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# step_fn(input_ids (N, t), token_type_ids (N, t), position_ids (N, t) or None, mask (N, t, L),
#         read (N,)) -> (N, V): the logits at position read[n] of the t new tokens, whose keys
#         and values the callee appends to its cache (L = cached tokens + t)
StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor
]


# ----------------------------------------------------------------------------------- masks
def seq2seq_mask(source_len: torch.Tensor, length: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T, T) bool, True where query i may attend key j (module docstring). `source_len`
    (B,) counts [CLS], the source and its [SEP]; `length` (B,) the real tokens."""
    i = torch.arange(T, device=length.device).view(1, T, 1)  # (1, T, 1) queries
    j = torch.arange(T, device=length.device).view(1, 1, T)  # (1, 1, T) keys
    s, n = source_len.view(-1, 1, 1), length.view(-1, 1, 1)  # (B, 1, 1)
    source_key = j < s  # (B, 1, T): every query, pads included, sees the source
    target = (s <= i) & (i < n) & (s <= j) & (j <= i)  # (B, T, T): real target queries, causal
    return source_key | target  # (B, T, T)


def padding_mask(length: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T, T) bool: every query (pads too) sees every real token, bidirectionally."""
    j = torch.arange(T, device=length.device).view(1, 1, T)  # (1, 1, T)
    return (j < length.view(-1, 1, 1)).expand(-1, T, T)  # (B, T, T)


# -------------------------------------------------------------------------------- features
def _pieces(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [e.ids for e in tokenizer.tok.encode_batch(list(texts), add_special_tokens=False)]


def _prefixes(tokenizer: Any, sources: Sequence[str], max_source: int) -> list[list[int]]:
    """`[CLS] source [SEP]` per source, truncated to `max_source` tokens (specials included)."""
    if max_source < 2:
        raise StokerError(f"max_source={max_source} leaves no room for [CLS] and [SEP]; use >= 2")
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    return [[cls, *ids[: max_source - 2], sep] for ids in _pieces(tokenizer, sources)]


def encode_seq2seq(
    tokenizer: Any,
    sources: list[str],
    targets: list[str],
    max_source: int,
    max_target: int,
    target_type: int = 1,
) -> list[dict]:
    """One feature per (source, target): input_ids, token_type_ids, source_len, length and
    next-token labels (module docstring). The target keeps `max_target` tokens, its [SEP]
    included."""
    if len(sources) != len(targets):
        raise StokerError(f"{len(sources)} sources but {len(targets)} targets; pair them 1:1")
    if max_target < 1:
        raise StokerError(f"max_target={max_target} leaves no room for the final [SEP]; use >= 1")
    feats = []
    prefixes = _prefixes(tokenizer, sources, max_source)
    for prefix, tgt in zip(prefixes, _pieces(tokenizer, targets), strict=True):
        target = [*tgt[: max_target - 1], tokenizer.sep_id]
        ids = prefix + target
        s, n = len(prefix), len(ids)
        labels = [IGNORE] * n
        labels[s - 1 : n - 1] = ids[s:n]  # position i predicts token i + 1
        feats.append({"input_ids": ids, "token_type_ids": [0] * s + [target_type] * len(target),
                      "source_len": s, "length": n, "labels": labels})  # fmt: skip
    return feats


def collate_seq2seq(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest feature: input_ids, token_type_ids, labels (IGNORE on pads) (B, T),
    mask (B, T, T) from `seq2seq_mask`, source_len and length (B,)."""
    B, T = len(features), max(f["length"] for f in features)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, f in enumerate(features):
        n = f["length"]
        ids[b, :n] = torch.tensor(f["input_ids"])
        types[b, :n] = torch.tensor(f["token_type_ids"])
        if "labels" in f:
            labels[b, :n] = torch.tensor(f["labels"])
    source_len = torch.tensor([f["source_len"] for f in features])  # (B,)
    length = torch.tensor([f["length"] for f in features])  # (B,)
    mask = seq2seq_mask(source_len, length, T)  # (B, T, T)
    return {"input_ids": ids, "token_type_ids": types, "labels": labels, "mask": mask,
            "source_len": source_len, "length": length}  # fmt: skip


# ------------------------------------------------------------------------------ generation
def _next_logits(
    logits_fn: LogitsFn,
    prefixes: list[list[int]],
    rows: list[int],
    hyps: list[list[int]],
    target_type: int,
    pad_id: int,
    device: str | torch.device,
) -> torch.Tensor:
    """(N, V) float32 logits of the token after each hypothesis: row n is `prefixes[rows[n]]`
    followed by `hyps[n]`, read at its last real position."""
    feats = []
    for r, h in zip(rows, hyps, strict=True):
        s = len(prefixes[r])
        types = [0] * s + [target_type] * len(h)
        feats.append({"input_ids": prefixes[r] + h, "token_type_ids": types, "source_len": s,
                      "length": s + len(h)})  # fmt: skip
    batch = collate_seq2seq(feats, pad_id)
    ids, types, mask = (batch[k].to(device) for k in ("input_ids", "token_type_ids", "mask"))
    logits = logits_fn(ids, types, mask, torch.tensor(rows, device=device))  # (N, T, V)
    last = (batch["length"] - 1).to(device)  # (N,)
    return logits[torch.arange(len(rows), device=device), last].float()  # (N, V)


def _check_generate(max_new_tokens: int, num_beams: int) -> None:
    if max_new_tokens < 1:
        raise StokerError(f"max_new_tokens={max_new_tokens}: generate at least 1 token")
    if num_beams < 1:
        raise StokerError(f"num_beams={num_beams}: use 1 (greedy) or more (beam search)")


@torch.no_grad()
def greedy_search(
    logits_fn: LogitsFn,
    tokenizer: Any,
    sources: list[str],
    max_source: int,
    max_new_tokens: int,
    target_type: int = 1,
    device: str | torch.device = "cpu",
) -> list[list[int]]:
    """Argmax decoding, batched over the sources; a row stops at [SEP] (not returned) or after
    `max_new_tokens` tokens."""
    _check_generate(max_new_tokens, 1)
    prefixes = _prefixes(tokenizer, sources, max_source)
    out: list[list[int]] = [[] for _ in sources]
    active = list(range(len(sources)))
    for _ in range(max_new_tokens):
        if not active:
            break
        hyps = [out[r] for r in active]
        logits = _next_logits(logits_fn, prefixes, active, hyps, target_type,
                              tokenizer.pad_id, device)  # fmt: skip
        still = []
        for r, t in zip(active, logits.argmax(-1).tolist(), strict=True):
            if t != tokenizer.sep_id:
                out[r].append(t)
                still.append(r)
        active = still
    return out


@torch.no_grad()
def cached_greedy_search(
    step_fn: StepFn,
    position_of: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    sources: list[str],
    max_source: int,
    max_new_tokens: int,
    target_type: int = 1,
    device: str | torch.device = "cpu",
) -> list[list[int]]:
    """`greedy_search`'s tokens with a key/value cache (module docstring): the prefixes in
    one forward, then one token per row per step; `position_of(index)` is the encoder's
    position id of a row's index-th token. A finished row keeps decoding, unread."""
    _check_generate(max_new_tokens, 1)
    prefixes = _prefixes(tokenizer, sources, max_source)
    feats = [{"input_ids": p, "token_type_ids": [0] * len(p), "source_len": len(p),
              "length": len(p)} for p in prefixes]  # fmt: skip
    batch = collate_seq2seq(feats, tokenizer.pad_id)
    ids, types, mask = (batch[k].to(device) for k in ("input_ids", "token_type_ids", "mask"))
    s = batch["source_len"].to(device)  # (N,)
    N, S = ids.shape
    logits = step_fn(ids, types, None, mask, s - 1)  # (N, V): what follows each [SEP]
    source_keys = torch.arange(S, device=device)[None] < s[:, None]  # (N, S)
    out: list[list[int]] = [[] for _ in sources]
    done = [False] * N
    for t in range(max_new_tokens):
        token = logits.float().argmax(-1)  # (N,)
        for r, tk in enumerate(token.tolist()):
            if not done[r]:
                done[r] = tk == tokenizer.sep_id
                if not done[r]:
                    out[r].append(tk)
        if all(done) or t == max_new_tokens - 1:
            break
        targets = torch.ones(N, t + 1, dtype=torch.bool, device=device)  # its own targets
        keys = torch.cat([source_keys, targets], 1)[:, None]  # (N, 1, S + t + 1)
        types = torch.full((N, 1), target_type, dtype=torch.long, device=device)
        logits = step_fn(token[:, None], types, position_of(s + t)[:, None], keys,
                         torch.zeros(N, dtype=torch.long, device=device))  # fmt: skip
    return out


def _advance(
    alive: list[tuple[float, list[int]]],
    logprobs: torch.Tensor,
    finished: list[tuple[float, list[int], int]],
    num_beams: int,
    sep: int,
) -> list[tuple[float, list[int]]]:
    """One beam step of one source: its alive (score, tokens) and their next-token log-probs
    (n, V) -> the new alive hypotheses; [SEP] candidates ranked above the last kept one go to
    `finished` as (score, tokens, length with the [SEP])."""
    scores = torch.tensor([a[0] for a in alive], dtype=torch.float64)  # (n,)
    total = scores[:, None] + logprobs.double()  # (n, V)
    k = min(2 * num_beams, total.shape[1])  # at most n of them are [SEP]: enough to refill
    top, token = total.topk(k, dim=1)  # (n, k)
    cands = zip(top.flatten().tolist(), range(top.numel()), token.flatten().tolist(), strict=True)
    flat = sorted(cands, key=lambda c: -c[0])  # best first
    new: list[tuple[float, list[int]]] = []
    for score, idx, t in flat:
        tokens = alive[idx // k][1]
        if t == sep:
            if len(finished) < num_beams:
                finished.append((score, tokens, len(tokens) + 1))
        else:
            new.append((score, [*tokens, t]))
        if len(new) == num_beams or len(finished) >= num_beams:
            break
    return new


@torch.no_grad()
def beam_search(
    logits_fn: LogitsFn,
    tokenizer: Any,
    sources: list[str],
    max_source: int,
    max_new_tokens: int,
    num_beams: int,
    target_type: int = 1,
    length_penalty: float = 1.0,
    device: str | torch.device = "cpu",
) -> list[tuple[list[int], float]]:
    """Beam search per source (all sources' hypotheses in one forward per step): `num_beams`
    hypotheses scored by summed log-probs; a source stops when `num_beams` hypotheses have
    ended with [SEP], or after `max_new_tokens` tokens (its live hypotheses then count as
    finished). Returns the best (tokens without [SEP], summed log-prob) per source, ranked by
    score / length**length_penalty (length counts the [SEP] of an ended hypothesis)."""
    _check_generate(max_new_tokens, num_beams)
    prefixes = _prefixes(tokenizer, sources, max_source)
    alive: list[list[tuple[float, list[int]]]] = [[(0.0, [])] for _ in sources]
    finished: list[list[tuple[float, list[int], int]]] = [[] for _ in sources]
    for _ in range(max_new_tokens):
        rows = [r for r, beams in enumerate(alive) for _ in beams]
        if not rows:
            break
        hyps = [h for beams in alive for _, h in beams]
        logits = _next_logits(logits_fn, prefixes, rows, hyps, target_type,
                              tokenizer.pad_id, device)  # fmt: skip
        logprobs = torch.log_softmax(logits, dim=-1).cpu()  # (N, V)
        start = 0
        for r, beams in enumerate(alive):
            n = len(beams)
            if n:
                step = logprobs[start : start + n]  # (n, V)
                alive[r] = _advance(beams, step, finished[r], num_beams, tokenizer.sep_id)
                if len(finished[r]) >= num_beams:
                    alive[r] = []
            start += n
    best = []
    for r in range(len(sources)):
        pool = finished[r] + [(s, h, len(h)) for s, h in alive[r]]
        score, tokens, _ = max(pool, key=lambda c: c[0] / c[2] ** length_penalty)
        best.append((tokens, score))
    return best


def generate(
    logits_fn: LogitsFn,
    tokenizer: Any,
    sources: list[str],
    max_source: int,
    max_new_tokens: int,
    num_beams: int = 1,
    target_type: int = 1,
    length_penalty: float = 1.0,
    device: str | torch.device = "cpu",
    cached: tuple[StepFn, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> list[list[int]]:
    """Generated target token ids per source, without the final [SEP]: greedy for
    `num_beams=1`, else beam search. `logits_fn(input_ids, token_type_ids, mask, rows)` gives
    (N, T, V) logits; `rows[n]` is the source that decode row n belongs to. Inputs are built
    on `device`. `cached` = (step_fn, position_of): greedy decodes with a key/value cache."""
    if num_beams == 1 and cached is not None:
        return cached_greedy_search(cached[0], cached[1], tokenizer, sources, max_source,
                                    max_new_tokens, target_type, device)  # fmt: skip
    if num_beams == 1:
        return greedy_search(logits_fn, tokenizer, sources, max_source, max_new_tokens,
                             target_type, device)  # fmt: skip
    found = beam_search(logits_fn, tokenizer, sources, max_source, max_new_tokens, num_beams,
                        target_type, length_penalty, device)  # fmt: skip
    return [tokens for tokens, _ in found]


# ------------------------------------------------------------------------------- code text
_PIECE = re.compile(r"[^\W_]+|\S")  # what BERT's pre-tokenizer splits: words, single symbols
# pairs that glue; `**=`, `//=`, `>>=`, `<<=`, `...` and triple quotes are chains of them
_OPERATORS = frozenset(
    ["**", "//", "==", "!=", "<=", ">=", "->", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=",
     "@=", "<<", ">>", ":=", "..", "{{", "}}", "''", '""']
)  # fmt: skip
_PREFIXES = frozenset(["f", "r", "b", "u", "rb", "br", "fr", "rf"])
_CASED = {k.lower(): k for k in ("None", "True", "False")}  # the keywords an uncased vocab folds
_CASED_RE = re.compile(r"\b(none|true|false)\b")
_EXPONENT = re.compile(r"\d+e", re.IGNORECASE)


def _is_word(p: str) -> bool:
    return p[:1].isalnum()


def _glue(before: str, a: str, b: str, after: str) -> bool:
    """Whether pieces `a` `b` are written together in Python code (context `before` a and
    `after` b): multi-character operators, quote runs, identifiers with `_`, string prefixes,
    escapes, numbers (`1.5`, `.5`, `1e-5`) and f-string conversions (`!r}`)."""
    if a + b in _OPERATORS or a == "\\":
        return True
    if "_" in (a, b):
        return (a == "_" or _is_word(a)) and (b == "_" or _is_word(b))
    if a.lower() in _PREFIXES and b in ("'", '"'):
        return True
    if (a.isdigit() and b == ".") or (a == "." and b[:1].isdigit()):
        return True
    if b in "+-" and _EXPONENT.fullmatch(a):  # `1e` `-` of 1e-5
        return True
    if a in "+-" and _EXPONENT.fullmatch(before) and b[:1].isdigit():  # `-` `5` of 1e-5
        return True
    if a == "!" and b in ("r", "s", "a") and after in ("}", ":"):
        return True
    return before == "!" and a in ("r", "s", "a") and b in ("}", ":")


def _context(pieces: list[str], k: int) -> tuple[str, str, str, str]:
    """The glue context of the gap between pieces k-1 and k."""
    before = pieces[k - 2] if k >= 2 else ""
    after = pieces[k + 1] if k + 1 < len(pieces) else ""
    return before, pieces[k - 1], pieces[k], after


def _mark_spaces(content: str, space: str) -> str:
    """One line of code without its indentation, with `space` in every gap between two
    pieces that `_glue` would close."""
    matches = list(_PIECE.finditer(content))
    pieces = [m.group() for m in matches]
    out = [pieces[0]] if pieces else []
    for k in range(1, len(pieces)):
        gap = content[matches[k - 1].end() : matches[k].start()]
        if gap and _glue(*_context(pieces, k)):
            gap = space
        out.append(gap + pieces[k])
    return "".join(out)


def code_to_text(
    code: str, newline: str = NEWLINE, indent: str = INDENT, space: str = SPACE
) -> str:
    """Python source as text for a WordPiece tokenizer: the code is dedented, newlines become
    `newline`, each leading indentation level (4 spaces or a tab) `indent`, and the spaces that
    `text_to_code` could not tell from none `space`."""
    lines = []
    for line in textwrap.dedent(code.replace("\r\n", "\n")).split("\n"):
        content = line.lstrip(" \t")
        levels = len(line[: len(line) - len(content)].replace("\t", "    ")) // 4
        lines.append(indent * levels + _mark_spaces(content.rstrip(), space))
    return newline.join(lines)


def _join(segment: str) -> str:
    """Decoded text (pieces separated by spaces or not) -> pieces spaced as code."""
    pieces = _PIECE.findall(segment)
    out = pieces[:1]
    for k in range(1, len(pieces)):
        out.append(("" if _glue(*_context(pieces, k)) else " ") + pieces[k])
    return "".join(out)


def text_to_code(
    text: str, newline: str = NEWLINE, indent: str = INDENT, space: str = SPACE
) -> str:
    """The inverse of `code_to_text` on decoded text (`tokenizer.decode` of its tokens): code
    that `ast.parse` accepts when the original did, up to case and spacing inside strings."""
    lines = []
    for line in text.split(newline):
        line = line.strip()
        levels = 0
        while line.startswith(indent):
            line, levels = line[len(indent) :].lstrip(), levels + 1
        segments = line.replace(indent, " ").split(space)
        lines.append("    " * levels + " ".join(_join(s) for s in segments).strip())
    return _CASED_RE.sub(lambda m: _CASED[m.group()], "\n".join(lines))


def register_code_tokens(tokenizer: Any, tokens: Sequence[str] = CODE_TOKENS) -> None:
    """Register the code tokens on `tokenizer.tok` as added tokens matched in raw text (never
    normalized or split) and kept by `decode`; they must already be in the vocabulary (BERT's
    `[unusedN]`), so the model's embedding table keeps its size."""
    from tokenizers import AddedToken

    missing = [t for t in tokens if tokenizer.tok.token_to_id(t) is None]
    if missing:
        raise StokerError(
            f"the tokenizer has no {missing[0]!r} token; code text needs a vocabulary with "
            "unused tokens (BERT's [unusedN]) or a tokenizer that keeps newlines"
        )
    tokenizer.tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
