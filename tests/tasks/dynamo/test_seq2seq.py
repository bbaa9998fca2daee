"""`stoker.tasks.dynamo.seq2seq`: UniLM's sequence-to-sequence mask, labels, generation, code text.

Models are tiny random BERT encoders (2 layers, width 32) over all-MiniLM-L6-v2's real
WordPiece vocabulary, with an LM head tied to the word embeddings as `logits_fn`. The mask is
checked on attention outputs (what a change of a token can reach); greedy decoding against a
step-by-step argmax of the full forward; beam search against greedy by independently recomputed
log-probs; code text by round trips of real stdlib functions through the real tokenizer.
"""

from __future__ import annotations

import ast
import inspect
import shlex
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from stoker.data.encoder_tokenizer import BERT_SPECIALS, EncoderTokenizer, load_encoder_tokenizer
from stoker.errors import StokerError
from stoker.models.encoder import EncoderConfig, build_encoder
from stoker.tasks.dynamo.seq2seq import (
    CODE_TOKENS,
    IGNORE,
    _prefixes,
    beam_search,
    code_to_text,
    collate_seq2seq,
    encode_seq2seq,
    generate,
    greedy_search,
    padding_mask,
    register_code_tokens,
    seq2seq_mask,
    text_to_code,
)

SOURCES = [
    "The cat sat on the mat.",
    "Hello world",
    "A much longer source sentence, about nothing in particular, that goes on.",
]
TARGETS = ["Le chat est assis.", "Bonjour le monde, encore et encore", "x"]


@pytest.fixture(scope="module")
def tok(minilm_dir) -> EncoderTokenizer:
    return load_encoder_tokenizer(minilm_dir)


def tiny_model(tok: EncoderTokenizer, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = EncoderConfig(n_layer=2, d_model=32, n_head=4, vocab_size=tok.vocab_size,
                        max_seq_len=128, init_std=0.2)  # fmt: skip  # peaked, not uniform
    return build_encoder(cfg).eval()


def lm_logits(model, sep_id: int | None = None, sep_bias: float = 0.0):
    """logits_fn of an LM head tied to the word embeddings; `sep_bias` makes [SEP] likelier."""

    def logits_fn(ids, types, mask, rows):
        h = model(ids, token_type_ids=types, attn_mask=mask)  # (N, T, C)
        logits = h @ model.embeddings.word_embeddings.weight.T  # (N, T, V)
        if sep_id is not None:
            logits[..., sep_id] += sep_bias
        return logits

    return logits_fn


def hidden(model, batch: dict, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = batch["input_ids"] if ids is None else ids
    with torch.no_grad():
        return model(ids, token_type_ids=batch["token_type_ids"], attn_mask=batch["mask"])


# ------------------------------------------------------------------------------------ mask
def test_mask_hides_the_target_from_the_source_and_later_target_tokens(tok):
    model = tiny_model(tok)
    batch = collate_seq2seq(encode_seq2seq(tok, SOURCES, TARGETS, 24, 12), tok.pad_id)
    base = hidden(model, batch)  # (B, T, C)
    g = torch.Generator().manual_seed(1)
    for b, (s, n) in enumerate(
        zip(batch["source_len"].tolist(), batch["length"].tolist(), strict=True)
    ):
        ids = batch["input_ids"].clone()
        ids[b, s:n] = torch.randint(1000, 20000, (n - s,), generator=g)  # the whole target
        out = hidden(model, batch, ids)
        torch.testing.assert_close(out[b, :s], base[b, :s], atol=1e-6, rtol=0)
        assert (out[b, s:n] - base[b, s:n]).abs().max() > 1e-3
        for k in range(s + 1, n):  # one later target token
            ids = batch["input_ids"].clone()
            ids[b, k] = 2000 + k
            out = hidden(model, batch, ids)
            torch.testing.assert_close(out[b, :k], base[b, :k], atol=1e-6, rtol=0)
            assert (out[b, k] - base[b, k]).abs().max() > 1e-3
        ids = batch["input_ids"].clone()
        ids[b, 1] = 3000  # a source token reaches every target position
        out = hidden(model, batch, ids)
        assert ((out[b, s:n] - base[b, s:n]).abs().amax(-1) > 1e-3).all()
        ids = batch["input_ids"].clone()
        ids[b, n:] = 4000  # pads reach nothing real
        torch.testing.assert_close(hidden(model, batch, ids)[b, :n], base[b, :n], atol=1e-6, rtol=0)


def test_mask_equals_its_definition_and_pad_rows_see_the_source():
    source_len, length, T = torch.tensor([2, 3, 5, 4]), torch.tensor([4, 7, 5, 9]), 9
    mask = seq2seq_mask(source_len, length, T)  # (B, T, T)
    assert mask.shape == (4, T, T) and mask.dtype == torch.bool
    for b, (s, n) in enumerate(zip(source_len.tolist(), length.tolist(), strict=True)):
        for i in range(T):
            for j in range(T):
                want = j < s or (s <= j <= i < n)
                assert mask[b, i, j].item() == want, (b, i, j)
    assert mask.any(-1).all()
    pad = padding_mask(length, T)
    assert pad.any(-1).all()
    assert torch.equal(pad, (torch.arange(T) < length[:, None])[:, None, :].expand(-1, T, T))


def test_mixed_seq2seq_and_padding_rows_give_finite_outputs(tok):
    model = tiny_model(tok)
    feats = encode_seq2seq(tok, SOURCES[:2], TARGETS[:2], 24, 12)
    batch = collate_seq2seq(feats, tok.pad_id)
    cls = tok.encode(["A classification example that is longer than both of them, yes indeed."])
    T = max(batch["input_ids"].shape[1], cls.input_ids.shape[1])
    ids = torch.full((3, T), tok.pad_id)
    ids[:2, : batch["input_ids"].shape[1]] = batch["input_ids"]
    ids[2, : cls.input_ids.shape[1]] = cls.input_ids[0]
    types = torch.zeros_like(ids)
    types[:2, : batch["input_ids"].shape[1]] = batch["token_type_ids"]
    length = torch.cat([batch["length"], cls.attention_mask.sum(1)])  # (3,)
    mask = torch.cat(
        [seq2seq_mask(batch["source_len"], length[:2], T), padding_mask(length[2:], T)]
    )
    with torch.no_grad():
        out = model(ids, token_type_ids=types, attn_mask=mask)  # (3, T, C)
        plain = model(ids[2:], attention_mask=(torch.arange(T) < length[2]).long()[None])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2], plain[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- labels
def test_labels_are_the_next_input_id_over_the_target_and_end_with_sep(tok):
    feats = encode_seq2seq(tok, SOURCES, TARGETS, max_source=10, max_target=5, target_type=1)
    for f, src in zip(feats, SOURCES, strict=True):
        ids, labels, s, n = f["input_ids"], f["labels"], f["source_len"], f["length"]
        assert len(ids) == len(labels) == len(f["token_type_ids"]) == n
        assert s <= 10 and n - s <= 5
        assert ids[0] == tok.cls_id and ids[s - 1] == tok.sep_id and ids[-1] == tok.sep_id
        assert ids[1 : s - 1] == tok.tok.encode(src, add_special_tokens=False).ids[: 10 - 2]
        assert f["token_type_ids"] == [0] * s + [1] * (n - s)
        for i in range(n):
            want = ids[i + 1] if s - 1 <= i <= n - 2 else IGNORE
            assert labels[i] == want, i
        assert labels[n - 2] == tok.sep_id
    batch = collate_seq2seq(feats, tok.pad_id)
    T = batch["input_ids"].shape[1]
    assert batch["labels"].shape == (3, T) and batch["mask"].shape == (3, T, T)
    for b, f in enumerate(feats):
        assert (batch["labels"][b, f["length"] :] == IGNORE).all()
        assert (batch["input_ids"][b, f["length"] :] == tok.pad_id).all()
    roberta_like = encode_seq2seq(tok, SOURCES[:1], TARGETS[:1], 10, 5, target_type=0)
    assert set(roberta_like[0]["token_type_ids"]) == {0}


# ------------------------------------------------------------------------------ generation
def stepwise_argmax(model, tok, source, max_source, max_new, logits_fn) -> list[int]:
    """Greedy decoding by hand: one unpadded row, the full forward at every step."""
    src = tok.tok.encode(source, add_special_tokens=False).ids[: max_source - 2]
    ids, s, out = [tok.cls_id, *src, tok.sep_id], len(src) + 2, []
    for _ in range(max_new):
        n = len(ids)
        x = torch.tensor([ids])
        types = torch.tensor([[0] * s + [1] * (n - s)])
        mask = seq2seq_mask(torch.tensor([s]), torch.tensor([n]), n)
        with torch.no_grad():
            t = logits_fn(x, types, mask, torch.tensor([0]))[0, -1].argmax().item()
        if t == tok.sep_id:
            break
        out.append(t)
        ids.append(t)
    return out


def sequence_logprob(tok, logits_fn, source, max_source, tokens, ended) -> float:
    """Summed log-prob of `tokens` (and the final [SEP] if `ended`) under one full forward."""
    feat = encode_seq2seq(tok, [source], [""], max_source, 1)[0]
    s = feat["source_len"]
    target = [*tokens, tok.sep_id] if ended else list(tokens)
    ids = feat["input_ids"][:s] + target
    n = len(ids)
    mask = seq2seq_mask(torch.tensor([s]), torch.tensor([n]), n)
    types = torch.tensor([[0] * s + [1] * (n - s)])
    with torch.no_grad():
        lp = logits_fn(torch.tensor([ids]), types, mask, torch.tensor([0]))[0].log_softmax(-1)
    return sum(lp[s - 1 + k, t].item() for k, t in enumerate(target))


def test_greedy_generate_equals_stepwise_argmax_of_the_full_forward(tok):
    model = tiny_model(tok)
    fn = lm_logits(model, tok.sep_id, sep_bias=4.0)
    got = generate(fn, tok, SOURCES, max_source=16, max_new_tokens=8)
    want = [stepwise_argmax(model, tok, src, 16, 8, fn) for src in SOURCES]
    assert got == want
    lengths = [len(g) for g in got]
    assert min(lengths) < 8 and max(lengths) == 8  # a row stopped at [SEP], one at the limit
    assert all(tok.sep_id not in g for g in got)
    found = beam_search(fn, tok, SOURCES, 16, 8, num_beams=1)
    assert [t for t, _ in found] == got


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_cached_greedy_equals_recomputing_greedy(tok, arch):
    """The key/value cache gives the full forward's tokens and logits (positions included)."""
    torch.manual_seed(0)
    cfg = EncoderConfig(arch=arch, n_layer=2, d_model=32, n_head=4, vocab_size=tok.vocab_size,
                        max_seq_len=128, init_std=0.2, pad_token_id=tok.pad_id)  # fmt: skip
    model = build_encoder(cfg).eval()
    fn = lm_logits(model, tok.sep_id, sep_bias=4.0)
    cache, seen = model.new_cache(), []

    def step_fn(ids, types, positions, mask, read):
        h = model(ids, token_type_ids=types, attn_mask=mask, position_ids=positions, cache=cache)
        logits = h[torch.arange(len(ids)), read] @ model.embeddings.word_embeddings.weight.T
        logits[:, tok.sep_id] += 4.0
        seen.append(logits)
        return logits

    want = generate(fn, tok, SOURCES, max_source=16, max_new_tokens=8)
    got = generate(fn, tok, SOURCES, max_source=16, max_new_tokens=8,
                   cached=(step_fn, model.embeddings.position_of))  # fmt: skip
    assert got == want and max(map(len, got)) >= 4
    # the last decode step's logits of the longest row (it read n targets), vs a full forward
    r, n = max(range(len(got)), key=lambda i: len(got[i])), len(seen) - 1
    prefix = _prefixes(tok, [SOURCES[r]], 16)[0]
    ids = torch.tensor([prefix + got[r][:n]])
    types = torch.tensor([[0] * len(prefix) + [1] * n])
    mask = seq2seq_mask(torch.tensor([len(prefix)]), torch.tensor([ids.shape[1]]), ids.shape[1])
    full = fn(ids, types, mask, torch.tensor([0]))[0, -1]
    torch.testing.assert_close(seen[-1][r], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("seed", "sep_bias"), [(0, 3.5), (1, 4.3), (2, 3.0), (3, 0.0)])
def test_beam_search_finds_a_target_at_least_as_likely_as_greedy(tok, seed, sep_bias):
    model = tiny_model(tok, seed)
    fn = lm_logits(model, tok.sep_id, sep_bias)
    max_new = 6
    greedy = greedy_search(fn, tok, SOURCES, 16, max_new)
    beams = beam_search(fn, tok, SOURCES, 16, max_new, num_beams=3, length_penalty=0.0)
    assert generate(fn, tok, SOURCES, 16, max_new, num_beams=3, length_penalty=0.0) == [
        t for t, _ in beams
    ]
    for src, g, (b, score) in zip(SOURCES, greedy, beams, strict=True):
        g_lp = sequence_logprob(tok, fn, src, 16, g, ended=len(g) < max_new)
        b_lp = sequence_logprob(tok, fn, src, 16, b, ended=len(b) < max_new)
        assert score == pytest.approx(b_lp, abs=1e-4)
        assert b_lp >= g_lp - 1e-5


def test_length_penalty_prefers_longer_targets(tok):
    model = tiny_model(tok)
    fn = lm_logits(model, tok.sep_id, sep_bias=3.8)
    short = beam_search(fn, tok, SOURCES, 16, 8, num_beams=4, length_penalty=0.0)
    long = beam_search(fn, tok, SOURCES, 16, 8, num_beams=4, length_penalty=2.0)
    assert all(len(s) <= len(g) for (s, _), (g, _) in zip(short, long, strict=True))
    assert any(len(s) < len(g) for (s, _), (g, _) in zip(short, long, strict=True))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rows_name_the_source_each_decode_row_belongs_to(tok, num_beams):
    model = tiny_model(tok)
    base = lm_logits(model)
    seen = []

    def gated(ids, types, mask, rows):
        seen.append(rows.tolist())
        logits = base(ids, types, mask, rows)  # (N, T, V)
        logits[torch.arange(len(rows)), :, 5000 + rows] += 100.0  # per-source "gate"
        return logits

    got = generate(gated, tok, SOURCES, 16, 4, num_beams=num_beams)
    assert got == [[5000 + r] * 4 for r in range(len(SOURCES))]
    assert seen[0] == list(range(len(SOURCES)))  # one row per source at the first step


# ------------------------------------------------------------------------------- code text
def skeleton(code: str) -> list[tuple[str, str]]:
    """Node types and (lower-cased) names, without constants: what must survive the trip."""
    out = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Constant):
            continue
        name = next((getattr(node, a) for a in ("id", "attr", "arg", "name")
                     if isinstance(getattr(node, a, None), str)), "")  # fmt: skip
        out.append((type(node).__name__, name.lower()))
    return out


@pytest.fixture
def code_tok(minilm_dir) -> EncoderTokenizer:
    t = load_encoder_tokenizer(minilm_dir)
    register_code_tokens(t)
    return t


def round_trip(t: EncoderTokenizer, code: str) -> str:
    ids = t.tok.encode(code_to_text(code), add_special_tokens=False).ids
    return text_to_code(t.decode(ids))


def test_code_tokens_are_single_tokens_that_decode_keeps(code_tok, minilm_dir):
    vocab_size = load_encoder_tokenizer(minilm_dir).vocab_size
    assert code_tok.vocab_size == vocab_size  # registered, not added: the embeddings fit
    for token in CODE_TOKENS:
        ids = code_tok.tok.encode(f"x{token}y", add_special_tokens=False).ids
        assert ids[1] == code_tok.token_to_id(token) and len(ids) == 3
        assert token in code_tok.decode(ids)


def stdlib_function(module: str, name: str) -> str:
    """A function's source from the stdlib's files (posixpath is frozen in 3.11:
    `inspect.getsource` cannot read it)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    text = path.read_text()
    node = next(n for n in ast.walk(ast.parse(text))
                if isinstance(n, ast.FunctionDef) and n.name == name)  # fmt: skip
    return ast.get_source_segment(text, node, padded=True)  # indented where nested


STDLIB = ["textwrap.dedent", "textwrap.indent", "textwrap.shorten", "shlex.quote",
          "shlex.split", "shlex.join", "posixpath.join", "posixpath.splitext",
          "posixpath.normpath", "posixpath.relpath", "posixpath.expanduser",
          "posixpath.commonpath"]  # fmt: skip


@pytest.mark.parametrize("qualname", STDLIB)
def test_stdlib_functions_round_trip_to_code_that_parses(code_tok, qualname):
    code = stdlib_function(*qualname.split("."))
    back = round_trip(code_tok, code)
    assert skeleton(back) == skeleton(textwrap.dedent(code))


def test_a_round_tripped_reference_body_completes_its_prompt(code_tok, dynamo_data):
    """What evaluation scores: decoded bodies (dedented, as trained) indented back as the
    prompt's function body parse with it, as the references do."""
    import json

    from stoker.tasks.dynamo.evaluate import as_body
    from stoker.tasks.dynamo.metrics import completes

    rows = [json.loads(line) for line in (dynamo_data / "code.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["origin"].startswith("stdlib:")][:200]
    ok = [completes(r["source"], as_body(round_trip(code_tok, r["target"]))) for r in rows]
    bad = [r["origin"] for r, o in zip(rows, ok, strict=True) if not o]
    assert sum(ok) >= 0.97 * len(rows), bad[:5]


def test_methods_are_dedented(code_tok):
    code = inspect.getsource(shlex.shlex.push_token)  # indented in its class
    assert skeleton(round_trip(code_tok, code)) == skeleton(textwrap.dedent(code))


SNIPPETS = [
    "for _ in range(3):\n    x_1 = 1.5e-3 ** 2 != .5\n    y **= -1_000\n",
    "def f(self, *, b=None):\n\treturn path.is_file() and not _x or self.__class__\n",
    "s = f'{x!r:>10} {{y}}' + r'\\d' + '\\'' + \"\\\"\" + '' '' + b'\\x00'\n",
    'def g():\n    """Doc "q".\n\n    More.\n    """\n    return a[::-1], b[1:], 1 .real\n',
    "def h(x) -> int:  # comment's\n    x >>= (1,\n           2); x //= 2; x @= m\n"
    "    x <<= 2; x %= 3\n"
    "    return x if x == y <= z >= w else ...\n",
]


@pytest.mark.parametrize("code", SNIPPETS)
def test_spacing_python_needs_survives_wordpiece_decoding(code_tok, code):
    back = round_trip(code_tok, code)
    assert skeleton(back) == skeleton(code)


# ------------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_stoker_errors(tok):
    with pytest.raises(StokerError, match="sources but"):
        encode_seq2seq(tok, SOURCES, TARGETS[:1], 16, 8)
    with pytest.raises(StokerError, match="max_source"):
        encode_seq2seq(tok, SOURCES, TARGETS, 1, 8)
    with pytest.raises(StokerError, match="max_target"):
        encode_seq2seq(tok, SOURCES, TARGETS, 16, 0)
    fn = lm_logits(tiny_model(tok))
    with pytest.raises(StokerError, match="num_beams"):
        generate(fn, tok, SOURCES, 16, 4, num_beams=0)
    with pytest.raises(StokerError, match="max_new_tokens"):
        generate(fn, tok, SOURCES, 16, 0)
    with pytest.raises(StokerError, match="max_source"):
        generate(fn, tok, SOURCES, 1, 4)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"])}
    small = EncoderTokenizer(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")), BERT_SPECIALS)
    with pytest.raises(StokerError, match=r"no '\[unused0\]' token"):
        register_code_tokens(small)
