"""SFT data: records -> targets on exactly the assistant text -> batches that are a pure
function of (seed, step), split identically across ranks and micro-steps, packed without
attention or targets crossing samples; bad input is a one-line error naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.data.test_chat_template import make_tokenizer_dir, smollm2_template

from stoker.data.sft import (
    IGNORE,
    MODES,
    SFTBatches,
    document_causal_mask,
    load_sft_meta,
    open_sft_split,
    prepare_sft,
)
from stoker.data.sft_sources import STDLIB_DOCSTRINGS, stdlib_docstring_records, stdlib_docstrings
from stoker.data.tokenizer import Tokenizer
from stoker.errors import StokerError

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Merci !"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Calling the tool."},
            {"role": "tool", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "21 °C — naïve 🤖"},
        ],
        "tools": [TOOL],
    },
    {
        "conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
        ]
    },
    {"prompt": "Name a prime.", "response": "7"},
    {"prompt": "Reply with JSON.", "response": '{"a": [1, 2]}', "system": "You emit JSON."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Say hi.", "output": "Hi!\nHow are you?"},
    {"instruction": "Empty input.", "input": "", "output": "  spaced  "},
]


def _write_jsonl(path: Path, records: list, raw_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory) -> Path:
    """A small BPE with SmolLM2's real chat template (ChatML; end of turn `<|im_end|>`)."""
    d = tmp_path_factory.mktemp("chat_tok")
    return make_tokenizer_dir(
        d,
        smollm2_template(),
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory) -> Path:
    """The same vocabulary without a chat template (EOS `<|endoftext|>`)."""
    return make_tokenizer_dir(tmp_path_factory.mktemp("plain_tok"), None)


@pytest.fixture(scope="module")
def docstrings(tmp_path_factory) -> Path:
    """300 real samples of the built-in stdlib signature -> docstring set, as JSONL."""
    path = tmp_path_factory.mktemp("docs") / "docstrings.jsonl"
    assert stdlib_docstrings(path, 300) == 300
    return path


@pytest.fixture(scope="module")
def doc_data(tmp_path_factory, docstrings, chat_tok) -> Path:
    d = tmp_path_factory.mktemp("doc_data")
    prepare_sft([str(docstrings)], chat_tok, d, val_fraction=0.1, seed=3)
    return d


def _supervised_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Token ids of each maximal run of targets."""
    runs, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, cur], []
    return runs + ([cur] if cur else [])


def _samples(data_dir: Path, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    meta = load_sft_meta(data_dir)
    a = open_sft_split(data_dir, meta, split)
    off = a["offsets"]
    return [
        (np.asarray(a["tokens"][s:e]), np.asarray(a["targets"][s:e]))
        for s, e in zip(off[:-1], off[1:], strict=True)
    ]


def _assistant_texts(record: dict) -> list[str]:
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    if "conversations" in record:
        return [m["value"] for m in record["conversations"] if m["from"] == "gpt"]
    return [record.get("response", record.get("output"))]


# ------------------------------------------------------------------------------ targets
def test_targets_decode_to_exactly_the_assistant_text_and_end_token(tmp_path, chat_tok):
    src = _write_jsonl(tmp_path / "mixed.jsonl", RECORDS)
    prepare_sft([str(src)], chat_tok, tmp_path / "data")
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer")
    samples = _samples(tmp_path / "data")
    assert len(samples) == len(RECORDS)
    for record, (ids, mask) in zip(RECORDS, samples, strict=True):
        got = [tok.decode(run) for run in _supervised_runs(ids, mask)]
        assert got == [t + "<|im_end|>" for t in _assistant_texts(record)], record
        assert not mask[0]


def test_plain_format_without_template_targets_response_and_eos(tmp_path, plain_tok):
    plain = [r for r in RECORDS if "messages" not in r and "conversations" not in r]
    src = _write_jsonl(tmp_path / "plain.jsonl", plain)
    meta = prepare_sft([str(src)], plain_tok, tmp_path / "data")
    assert meta["template"] == "plain"
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer")
    for record, (ids, mask) in zip(plain, _samples(tmp_path / "data"), strict=True):
        assert [tok.decode(r) for r in _supervised_runs(ids, mask)] == [
            _assistant_texts(record)[0] + "<|endoftext|>"
        ]
        assert tok.decode(ids.tolist()).endswith(
            "### Response:\n" + _assistant_texts(record)[0] + "<|endoftext|>"
        )


def test_parquet_with_the_same_columns_gives_the_same_samples(tmp_path, chat_tok):
    pa = pytest.importorskip("pyarrow")  # a dev dependency: present wherever tests run
    import pyarrow.parquet as pq

    rows = [{"system": None, **r} for r in RECORDS if "prompt" in r]  # one schema for all rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    prepare_sft([str(tmp_path / "p.parquet")], chat_tok, tmp_path / "a")
    prepare_sft([str(_write_jsonl(tmp_path / "p.jsonl", rows))], chat_tok, tmp_path / "b")
    for (i, m), (j, n) in zip(_samples(tmp_path / "a"), _samples(tmp_path / "b"), strict=True):
        assert i.tolist() == j.tolist() and m.tolist() == n.tolist()


# ------------------------------------------------------------------------------ prepare
def test_prepare_is_a_no_op_when_up_to_date_and_redoes_on_change(tmp_path, chat_tok):
    src = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    first = prepare_sft([str(src)], chat_tok, tmp_path / "data")
    stamp = (tmp_path / "data" / "meta.json").stat().st_mtime_ns
    assert prepare_sft([str(src)], chat_tok, tmp_path / "data") == first
    assert (tmp_path / "data" / "meta.json").stat().st_mtime_ns == stamp
    _write_jsonl(src, RECORDS[:3])
    again = prepare_sft([str(src)], chat_tok, tmp_path / "data")
    assert again["fingerprint"] != first["fingerprint"]
    assert again["splits"]["train"]["samples"] == 3
    assert not list(tmp_path.glob("data/.prepare-*"))


def test_tokenizer_files_travel_and_load_in_transformers(tmp_path, chat_tok):
    from transformers import PreTrainedTokenizerFast

    src_tok = tmp_path / "tok"
    src_tok.mkdir()
    for f in chat_tok.iterdir():
        (src_tok / f.name).write_bytes(f.read_bytes())
    (src_tok / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<|im_end|>"}))
    (src_tok / "chat_template.jinja").write_text(smollm2_template())
    src = _write_jsonl(tmp_path / "d.jsonl", RECORDS[:2])
    meta = prepare_sft([str(src)], src_tok, tmp_path / "data")
    out = tmp_path / "data" / "tokenizer"
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        assert (out / name).read_bytes() == (src_tok / name).read_bytes() or (
            name == "tokenizer_config.json"
        )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == smollm2_template() and config["pad_token"] == "<|endoftext|>"
    assert meta["pad_id"] == Tokenizer.load(out).token_to_id("<|endoftext|>")
    hf = PreTrainedTokenizerFast.from_pretrained(out)
    ids, _ = _samples(tmp_path / "data")[0]
    assert (
        hf.apply_chat_template(RECORDS[0]["messages"], tokenize=True, return_dict=False)
        == ids.tolist()
    )


def test_checkpoint_copy_keeps_chat_template_files(tmp_path, chat_tok):
    from stoker.data.tokenizer import copy_tokenizer_files

    (tmp_path / "src").mkdir()
    for f in chat_tok.iterdir():
        (tmp_path / "src" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "src" / "chat_template.jinja").write_text("{{ messages }}")
    assert copy_tokenizer_files(tmp_path / "src", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "chat_template.jinja").read_text() == "{{ messages }}"


def test_builtin_stdlib_docstrings_are_deterministic_and_usable(tmp_path, chat_tok):
    first = list(stdlib_docstring_records(50))
    assert first == list(stdlib_docstring_records(50)) and len(first) == 50
    assert all(r["prompt"].count("\n") == 1 and r["response"] for r in first)
    assert len({r["prompt"] for r in first}) == 50
    meta = prepare_sft([STDLIB_DOCSTRINGS], chat_tok, tmp_path / "data", max_samples=20)
    assert meta["splits"]["train"]["samples"] == 20


# ------------------------------------------------------------------------------ batches
def _row_contents(b) -> list[tuple[list[int], list[int]]]:
    """Each row's non-padding (inputs, labels), independent of how wide the tensor is."""
    keep = b.doc_ids >= 0
    return [
        (b.input_ids[i][keep[i]].tolist(), b.labels[i][keep[i]].tolist())
        for i in range(b.input_ids.shape[0])
    ]


@pytest.mark.parametrize("mode", MODES)
def test_batches_are_a_pure_function_of_seed_and_step(doc_data, mode):
    a = SFTBatches(doc_data, "train", 320, 8, seed=1, mode=mode)
    b = SFTBatches(doc_data, "train", 320, 8, seed=1, mode=mode)
    seq = [a.batch(s) for s in range(40)]  # crosses epochs: 270 samples, ≥ 8 rows a step
    for s in (39, 0, 17):  # any order, fresh object
        assert torch.equal(seq[s].input_ids, b.batch(s).input_ids)
        assert torch.equal(seq[s].labels, b.batch(s).labels)
    other = SFTBatches(doc_data, "train", 320, 8, seed=2, mode=mode)
    assert _row_contents(other.batch(0)) != _row_contents(seq[0])
    c = SFTBatches(doc_data, "train", 320, 8, seed=1, mode=mode)
    c.load_state_dict(a.state_dict())
    assert c.next_step == 40 and _row_contents(c.batch(40)) == _row_contents(a.batch(40))


@pytest.mark.parametrize("mode", MODES)
def test_world_and_micro_splits_give_the_same_global_batch(doc_data, mode):
    data = SFTBatches(doc_data, "train", 320, 8, seed=0, mode=mode)
    for step in (0, 5, 33):
        whole = data.batch(step)
        assert whole.n_targets == whole.global_targets > 0
        for world, n_micro in ((1, 2), (2, 1), (2, 2), (4, 2)):
            parts = [
                data.batch(step, k, world, m, n_micro) for k in range(world) for m in range(n_micro)
            ]
            assert sum((_row_contents(p) for p in parts), []) == _row_contents(whole)
            assert {p.global_targets for p in parts} == {whole.global_targets}
            assert sum(p.n_targets for p in parts) == whole.global_targets


@pytest.mark.parametrize("mode", MODES)
def test_each_epoch_uses_every_sample_once(doc_data, mode):
    data = SFTBatches(doc_data, "train", 320, 8, seed=0, mode=mode)
    n = len(data.lengths)
    for epoch in (0, 1):
        flat, ptr = data.epoch_rows(epoch)
        assert sorted(flat.tolist()) == list(range(n)) and ptr[-1] == n
        assert all(
            data.lengths[flat[s:e]].sum() <= 320 for s, e in zip(ptr[:-1], ptr[1:], strict=True)
        )
    assert data.epoch_rows(0)[0].tolist() != data.epoch_rows(1)[0].tolist()


def test_packing_keeps_attention_and_targets_inside_each_sample(doc_data):
    data = SFTBatches(doc_data, "train", 320, 8, seed=0, mode="pack")
    samples = _samples(doc_data)
    b = data.batch(2)
    flat, ptr = data.epoch_rows(0)
    assert (b.doc_ids.max(dim=1).values >= 1).sum() >= 6  # most rows hold several samples
    for i in range(b.input_ids.shape[0]):
        row_samples = flat[ptr[2 * 8 + i] : ptr[2 * 8 + i + 1]].tolist()
        for d, s in enumerate(row_samples):
            at = b.doc_ids[i] == d
            ids, mask = samples[s][0].astype(np.int64), samples[s][1]
            assert b.position_ids[i][at].tolist() == list(range(len(ids) - 1))
            assert b.input_ids[i][at].tolist() == ids[:-1].tolist()
            want = np.where(mask[1:].astype(bool), ids[1:], IGNORE)
            assert b.labels[i][at].tolist() == want.tolist()  # the last one targets its own EOT
        assert (b.labels[i][b.doc_ids[i] < 0] == IGNORE).all()
    mask = document_causal_mask(b.doc_ids)[:, 0]  # (B, T, T)
    same = b.doc_ids[:, :, None] == b.doc_ids[:, None, :]
    assert not (mask & ~same).any() and not mask.triu(1).any() and mask.diagonal(0, 1, 2).all()


def test_document_mask_makes_packed_attention_equal_separate_attention():
    torch.manual_seed(0)
    lengths = [5, 3, 6]
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))  # (B, H, T, D), last 2 are padding
    doc = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] + [-1, -1]])
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc))
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = F.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True
        )
        torch.testing.assert_close(packed[:, :, sl], alone, rtol=1e-6, atol=1e-6)
        start += n
    assert torch.isfinite(packed).all()


def test_packing_and_bucketing_waste_less_than_padding(doc_data):
    fill = {}
    for mode in MODES:
        data = SFTBatches(doc_data, "train", 320, 8, seed=0, mode=mode)
        batches = [data.batch(s) for s in range(10)]
        fill[mode] = sum(b.n_tokens for b in batches) / sum(b.input_ids.numel() for b in batches)
    assert fill["pack"] > 0.8 and fill["pad"] < 0.6 and fill["bucket"] > fill["pad"]


def test_eval_batches_cover_the_split_once(doc_data):
    data = SFTBatches(doc_data, "val", 320, 4, seed=0, mode="pack")
    batches = list(data.eval_batches())
    total = load_sft_meta(doc_data)["splits"]["val"]
    assert sum(b.n_targets for b in batches) == total["targets"] == data.sample_targets.sum()
    ranks = [list(data.eval_batches(rank=r, world=2)) for r in range(2)]
    assert sum(b.n_targets for r in ranks for b in r) == total["targets"]


@pytest.mark.slow
def test_loss_on_sft_batches_falls_with_a_tiny_decoder(doc_data):
    from stoker.config import ModelConfig
    from stoker.models.gpt import build_model

    torch.manual_seed(0)
    data = SFTBatches(doc_data, "train", 320, 4, seed=0, mode="bucket")
    model = build_model(
        ModelConfig(vocab_size=1280, d_model=64, n_layer=2, n_head=4, max_seq_len=320)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        b = data.batch(step)
        logits = model(b.input_ids)
        loss = (
            F.cross_entropy(
                logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            / b.global_targets
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses  # nats per target


# ------------------------------------------------------------------------------ bad input
def _one_line_error(call, *needles: str) -> str:
    with pytest.raises(StokerError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "x"}]}',
            "role 'asistant'",
        ),
        ('{"prompt": "hi", "response": 3}', "'response' must be a string"),
        ('{"text": "not a sample"}', "none of the sample shapes"),
        ('{"messages": [{"role": "user", "content": "a"}', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, chat_tok, line, what):
    src = _write_jsonl(tmp_path / "bad.jsonl", RECORDS[:2], ("", line))
    _one_line_error(lambda: prepare_sft([str(src)], chat_tok, tmp_path / "data"), f"{src}:4", what)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_chat_data_without_a_template_suggests_plain_data(tmp_path, plain_tok):
    src = _write_jsonl(tmp_path / "chat.jsonl", RECORDS[:1])
    _one_line_error(
        lambda: prepare_sft([str(src)], plain_tok, tmp_path / "data"),
        f"{src}:1",
        "no chat template",
        "prompt/response",
    )


def test_template_refusing_a_sample_names_it(tmp_path, chat_tok):
    from tests.data.test_chat_template import MISTRAL_STYLE

    (tmp_path / "m.jinja").write_text(MISTRAL_STYLE)
    src = _write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], RECORDS[1]])  # 2nd has a system turn
    _one_line_error(
        lambda: prepare_sft(
            [str(src)], chat_tok, tmp_path / "data", template=str(tmp_path / "m.jinja")
        ),
        f"{src}:2",
        "refused by the chat template",
        "alternate",
    )


def test_truncation_that_leaves_no_target_names_the_sample(tmp_path, chat_tok):
    long_prompt = {"prompt": "word " * 200, "response": "ok"}
    src = _write_jsonl(tmp_path / "d.jsonl", [RECORDS[4], long_prompt])
    prepare_sft([str(src)], chat_tok, tmp_path / "data")
    msg = _one_line_error(
        lambda: SFTBatches(tmp_path / "data", "train", 128, 2, 0), f"{src}:2", "seq_len=128"
    )
    needed = int(msg.rsplit("seq_len ≥ ", 1)[1].split(",")[0])
    SFTBatches(tmp_path / "data", "train", needed, 2, 0)  # the suggested seq_len is enough
    _one_line_error(lambda: SFTBatches(tmp_path / "data", "train", needed - 1, 2, 0), f"{src}:2")


def test_changed_array_and_bad_settings_are_one_line_errors(tmp_path, chat_tok):
    src = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    prepare_sft([str(src)], chat_tok, tmp_path / "data")
    _one_line_error(
        lambda: SFTBatches(tmp_path / "data", "train", 256, 2, 0, mode="ragged"),
        "pack | bucket | pad",
    )
    _one_line_error(
        lambda: SFTBatches(tmp_path / "data", "train", 256, 3, 0).batch(0, 0, 2), "not divisible"
    )
    _one_line_error(
        lambda: prepare_sft([str(tmp_path / "none")], chat_tok, tmp_path / "x"), "no such file"
    )
    arr = tmp_path / "data" / "train-targets.npy"
    arr.write_bytes(arr.read_bytes()[:-1] + b"\x01")
    _one_line_error(lambda: load_sft_meta(tmp_path / "data"), "train-targets.npy", "changed")
