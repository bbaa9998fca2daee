"""The DYNAMO tasks' metrics, every one on a 0..100 scale.

- `accuracy`: % of predicted labels equal to the gold ones.
- `squad_scores`: the official SQuAD v1.1 evaluation (Rajpurkar et al. 2016, evaluate-v1.1.py):
  answers normalized by lower-casing, removing punctuation, the articles a/an/the and extra
  whitespace; exact match and token-level F1, each the maximum over an example's gold answers,
  averaged over examples (an example without a prediction scores 0).
- `rouge_scores`: ROUGE-1/2/L F-measures (Lin 2004) from Google's `rouge-score` package with
  its Porter stemmer, averaged over examples.
- `bleu_score`: corpus sacreBLEU (Post 2018) with its default 13a tokenizer, one reference.
- `exact_match`: % of outputs equal to their reference after stripping outer whitespace.
- `parse_rate`: % of outputs Python's `ast.parse` accepts (generated code). With the prompts
  (a def line and docstring each), an output counts only as the body of its prompt's function:
  prompt + output must parse, with the function getting at least one statement beyond its
  docstring and nothing left after it at module level. (Alone, a docstring is a complete body
  and most stray words are valid expressions, so the plain rate rewards an untrained model.)

`normalized(metric, value)` maps a metric to 0..1 for phase 3's macro average.
"""

from __future__ import annotations

import ast
import re
import string
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

from stoker.errors import StokerError

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _same_length(preds: Sequence, refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _same_length(preds, labels)
    return (
        100.0
        * sum(int(p) == int(y) for p, y in zip(preds, labels, strict=True))
        / max(len(labels), 1)
    )


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalization: lower, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(preds: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} (%) over the examples of `golds` (id -> gold answer texts)."""
    em = f1 = 0.0
    for qid, answers in golds.items():
        if not answers:
            raise ValueError(f"example {qid!r} has no gold answer")
        if qid not in preds:
            continue
        pred = preds[qid]
        em += max(float(normalize_answer(pred) == normalize_answer(a)) for a in answers)
        f1 += max(squad_f1(pred, a) for a in answers)
    n = max(len(golds), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise StokerError(
            "ROUGE needs the rouge-score package: pip install 'stoker[eval]'"
        ) from None
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (%), stemmed."""
    _same_length(preds, refs)
    scorer = _rouge_scorer()
    total = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs, strict=True):
        for k, s in scorer.score(r, p).items():
            total[k] += s.fmeasure
    n = max(len(refs), 1)
    return {k: 100.0 * v / n for k, v in total.items()}


def bleu_score(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus sacreBLEU (%), one reference per output."""
    _same_length(preds, refs)
    try:
        import sacrebleu
    except ImportError:
        raise StokerError("BLEU needs the sacrebleu package: pip install 'stoker[eval]'") from None
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    _same_length(preds, refs)
    return (
        100.0
        * sum(p.strip() == r.strip() for p, r in zip(preds, refs, strict=True))
        / max(len(refs), 1)
    )


def _module(code: str) -> ast.Module | None:
    with warnings.catch_warnings():  # invalid escapes in generated code warn, not fail
        warnings.simplefilter("ignore")
        try:
            return ast.parse(code)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None


def parses(code: str) -> bool:
    return _module(code) is not None


def completes(prompt: str, body: str) -> bool:
    """Whether `body` is a non-empty body of the function `prompt` (its def line, docstring
    and anything before it) ends with: prompt + body parses, its last top-level statement is
    that function, and the function has a statement on a line of `body`."""
    prompt = prompt if prompt.endswith("\n") else prompt + "\n"
    n = prompt.count("\n")  # lines 1..n are the prompt's
    whole = _module(prompt + body) if body.strip() else None
    if whole is None or not whole.body:
        return False
    last = whole.body[-1]
    return (isinstance(last, (ast.FunctionDef, ast.AsyncFunctionDef)) and last.lineno <= n
            and any(stmt.lineno > n for stmt in last.body))  # fmt: skip


def parse_rate(texts: Sequence[str], prompts: Sequence[str] | None = None) -> float:
    """% of `texts` that are valid Python (an empty output counts as not parsed), or with
    `prompts`, that complete their prompt's function (`completes`)."""
    if prompts is None:
        ok = [bool(t.strip()) and parses(t) for t in texts]
    else:
        ok = [completes(p, t) for p, t in zip(prompts, texts, strict=True)]
    return 100.0 * sum(ok) / max(len(texts), 1)


def normalized(metric: str, value: float) -> float:
    """`value` (0..100) on 0..1: every metric here is a percentage, higher is better."""
    known = {"accuracy", "f1", "exact_match", "rouge1", "rouge2", "rougeL", "bleu", "parse_rate"}
    if metric not in known:
        raise StokerError(f"unknown metric {metric!r}; known: {', '.join(sorted(known))}")
    return value / 100.0
