"""Extractive QA: token features with span labels from offset mappings, and answer decoding.

`qa_features` encodes `[CLS] question [SEP] context [SEP]` (the tokenizer's own pair template,
so RoBERTa gets `<s> q </s></s> c </s>`); a context longer than the window is split into
windows that overlap by `doc_stride` tokens (the tokenizer's `only_second` truncation with a
stride, as the SQuAD fine-tuning scripts of BERT and transformers do), the question cut to
`max_question_tokens` first. Labels are token indices: the first window token whose character
span holds the answer's first character, and the last one holding its last; a window that does
not contain the whole answer labels both 0 (the [CLS] position). An answer whose characters do
not begin and end on token boundaries cannot be labelled exactly: such a window keeps the
covering tokens and is marked `exact: False`, and `label_problems` counts them so callers can
report and drop them instead of training on a different span.

`qa_decode` is the usual n-best search: per window the `n_best` largest start and end logits,
pairs inside the context with start ≤ end and at most `max_answer_length` tokens, score =
start + end logit, the best over the example's windows; the answer is the context's characters
from the start token's first to the end token's last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _question(tokenizer, question: str, max_tokens: int) -> str:
    """`question` cut after its `max_tokens`-th token (on a character boundary)."""
    enc = tokenizer.tok.encode(question, add_special_tokens=False)
    if len(enc.ids) <= max_tokens:
        return question
    return question[: enc.offsets[max_tokens - 1][1]]


def _label(offsets: list, answer: dict) -> tuple[int, int, bool]:
    """(start token, end token, exact) of `answer` in one window; (0, 0, True) if outside."""
    s = answer["answer_start"]
    e = s + len(answer["text"])
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > s or offsets[ctx[-1]][1] < e:
        return 0, 0, True
    start = next(i for i in ctx if offsets[i][1] > s)
    end = next(i for i in reversed(ctx) if offsets[i][0] < e)
    exact = offsets[start][0] == s and offsets[end][1] == e
    return start, end, exact


def qa_features(
    tokenizer, examples: Sequence[dict], max_length: int, doc_stride: int,
    max_question_tokens: int = 64,
) -> list[dict[str, Any]]:  # fmt: skip
    """One feature per window of every example (module docstring): input_ids,
    token_type_ids, attention_mask, offsets (context tokens' character spans, None
    elsewhere), example_index, start_position, end_position, exact."""
    if doc_stride >= max_length:
        raise ValueError(f"doc_stride {doc_stride} must be below max_length {max_length}")
    tok = tokenizer.tok
    feats = []
    try:
        for i, ex in enumerate(examples):
            q = _question(tokenizer, ex["question"], max_question_tokens)
            q_len = len(tok.encode(q, add_special_tokens=False).ids)
            room = max_length - q_len - tok.num_special_tokens_to_add(True)
            if room < 1:
                raise ValueError(f"max_length {max_length} leaves no room for the context")
            tok.enable_truncation(max_length, stride=min(doc_stride, room - 1),
                                  strategy="only_second")  # fmt: skip
            enc = tok.encode(q, ex["context"])
            for w in [enc, *enc.overflowing]:
                offsets = [tuple(o) if sid == 1 else None
                           for o, sid in zip(w.offsets, w.sequence_ids, strict=True)]  # fmt: skip
                f = {"input_ids": list(w.ids), "token_type_ids": list(w.type_ids),
                     "attention_mask": list(w.attention_mask), "offsets": offsets,
                     "example_index": i, "start_position": 0, "end_position": 0, "exact": True}  # fmt: skip
                if ex.get("answers"):
                    s, e, exact = _label(offsets, ex["answers"][0])
                    f |= {"start_position": s, "end_position": e, "exact": exact}
                feats.append(f)
    finally:
        tok.no_truncation()
    return feats


def label_problems(features: Sequence[dict]) -> int:
    """Windows whose labelled span is not exactly the answer's characters."""
    return sum(not f["exact"] for f in features)


def span_text(feature: dict, context: str, start: int, end: int) -> str:
    off = feature["offsets"]
    return context[off[start][0] : off[end][1]]


def qa_decode(
    starts: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], features: Sequence[dict],
    examples: Sequence[dict], n_best: int = 20, max_answer_length: int = 30,
) -> dict[str, str]:  # fmt: skip
    """Example id -> predicted answer text; `starts[j]`/`ends[j]` are feature j's logits
    (padded beyond its length is fine). Examples without a valid span get ""."""
    if not (len(starts) == len(ends) == len(features)):
        raise ValueError(
            f"{len(starts)} start and {len(ends)} end rows for {len(features)} features"
        )
    best: dict[int, tuple[float, str]] = {}
    for s_log, e_log, f in zip(starts, ends, features, strict=True):
        n = len(f["input_ids"])
        s_log, e_log = s_log[:n].float(), e_log[:n].float()
        ctx = torch.tensor([o is not None for o in f["offsets"]])
        if not ctx.any():
            continue
        s_masked = s_log.masked_fill(~ctx, float("-inf"))
        e_masked = e_log.masked_fill(~ctx, float("-inf"))
        k = min(n_best, int(ctx.sum()))
        s_idx, e_idx = s_masked.topk(k).indices.tolist(), e_masked.topk(k).indices.tolist()
        ex = examples[f["example_index"]]
        for a in s_idx:
            for b in e_idx:
                if b < a or b - a + 1 > max_answer_length:
                    continue
                score = float(s_log[a] + e_log[b])
                i = f["example_index"]
                if i not in best or score > best[i][0]:
                    best[i] = (score, span_text(f, ex["context"], a, b))
    return {str(ex["id"]): best[i][1] if i in best else "" for i, ex in enumerate(examples)}
