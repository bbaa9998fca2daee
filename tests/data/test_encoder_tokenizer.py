"""`stoker.data.encoder_tokenizer` against `transformers`' fast tokenizers, on sentence pairs.

Ids, token type ids, attention masks and character offsets must be equal to
`tokenizer(a, b, return_offsets_mapping=True)` for: all-MiniLM-L6-v2's WordPiece (its
tokenizer.json, and its vocab.txt alone), and a RoBERTa byte-level BPE trained here on stdlib
source (vocab.json + merges.txt, and the tokenizer.json transformers saves from it); padded to
the longest pair, and truncated `only_second` / `longest_first` with padding to max_length.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

try:
    import transformers
except ImportError as e:  # the dev extra installs it: a broken install fails, never skips
    pytest.fail(f"parity needs transformers (pip install -e '.[dev]'): {e}", pytrace=False)

from stoker.data.encoder_tokenizer import load_encoder_tokenizer  # noqa: E402
from stoker.errors import StokerError  # noqa: E402

QUESTIONS = [
    "Who wrote Emma?",
    "What does the [MASK] token   do in BERT's pre-training, exactly?",
    "Où est la café naïve?",
    "Why?",
]
CONTEXTS = [
    "Emma is a novel written by Jane Austen, first published in December 1815.",
    "It marks positions (15% of them) whose tokens the model must predict.",
    "Près de la gare — 3.14 km, d'après la carte 東京.",
    "Because  the  spaces\tand\nnewlines matter for offsets.",
]


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    """A tiny RoBERTa byte-level BPE (vocab 700) trained on stdlib source: vocab.json +
    merges.txt, RoBERTa's special tokens at RoBERTa's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:20]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    d = tmp_path_factory.mktemp("roberta-bpe")
    tok.model.save(str(d))
    assert {p.name for p in d.iterdir()} == {"vocab.json", "merges.txt"}
    return d


def source(name: str, minilm: Path, roberta_dir: Path, tmp: Path) -> tuple[Path, object]:
    """(directory ours loads, the transformers tokenizer to compare with) for one SOURCES name."""
    if name == "minilm-tokenizer.json":
        return minilm, transformers.AutoTokenizer.from_pretrained(minilm)
    if name == "minilm-vocab.txt":
        (tmp / "vocab-only").mkdir()
        shutil.copy(minilm / "vocab.txt", tmp / "vocab-only" / "vocab.txt")
        return tmp / "vocab-only", transformers.BertTokenizerFast.from_pretrained(
            tmp / "vocab-only"
        )
    roberta = transformers.RobertaTokenizerFast.from_pretrained(roberta_dir)
    if name == "roberta-vocab+merges":
        return roberta_dir, roberta
    roberta.save_pretrained(tmp / "roberta-json")
    assert (tmp / "roberta-json" / "tokenizer.json").is_file()
    return tmp / "roberta-json", transformers.AutoTokenizer.from_pretrained(tmp / "roberta-json")


SOURCES = ["minilm-tokenizer.json", "minilm-vocab.txt", "roberta-vocab+merges",
           "roberta-tokenizer.json"]  # fmt: skip


def assert_equal_to_hf(batch, ref) -> None:
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    assert batch.token_type_ids.tolist() == ref["token_type_ids"].tolist()
    assert batch.attention_mask.tolist() == ref["attention_mask"].tolist()
    assert batch.offsets.tolist() == ref["offset_mapping"].tolist()


def hf_encode(ref, questions, contexts, **kw):
    return ref(questions, contexts, return_offsets_mapping=True, return_token_type_ids=True,
               return_tensors="pt", **kw)  # fmt: skip


@pytest.mark.parametrize("name", SOURCES)
def test_pairs_equal_transformers_ids_types_offsets(minilm_dir, roberta_dir, tmp_path, name):
    path, ref = source(name, minilm_dir, roberta_dir, tmp_path)
    ours = load_encoder_tokenizer(path)
    mask = ours.specials["mask_token"]
    questions = [q.replace("[MASK]", mask) for q in QUESTIONS]  # a special token inside text
    batch = ours.encode(questions, CONTEXTS)
    assert_equal_to_hf(batch, hf_encode(ref, questions, CONTEXTS, padding=True))
    assert batch.input_ids[:, 0].eq(ours.cls_id).all()
    assert (batch.input_ids == ours.mask_id).sum() == 1
    assert (batch.attention_mask == 0).any()  # pairs of different lengths: padded


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("truncation", ["only_second", "longest_first"])
def test_truncation_and_max_length_padding_equal_transformers(
    minilm_dir, roberta_dir, tmp_path, name, truncation
):
    path, ref = source(name, minilm_dir, roberta_dir, tmp_path)
    ours = load_encoder_tokenizer(path)
    n = 48 if name.startswith("roberta") else 32  # room for every question in the tiny BPE
    batch = ours.encode(QUESTIONS, CONTEXTS, max_length=n, truncation=truncation,
                        padding="max_length")  # fmt: skip
    ref_batch = hf_encode(ref, QUESTIONS, CONTEXTS, max_length=n, truncation=truncation,
                          padding="max_length")  # fmt: skip
    assert batch.input_ids.shape == (len(QUESTIONS), n)
    assert ours.encode(QUESTIONS, CONTEXTS).input_ids.shape[1] > n  # something was cut
    assert_equal_to_hf(batch, ref_batch)


def test_bert_pair_layout_and_sequence_ids(minilm_dir):
    ours = load_encoder_tokenizer(minilm_dir)
    batch = ours.encode("who wrote emma?", "jane austen wrote emma.")
    ids, seq = batch.input_ids[0].tolist(), batch.sequence_ids[0].tolist()
    sep = [i for i, t in enumerate(ids) if t == ours.sep_id]
    assert ids[0] == ours.cls_id and len(sep) == 2 and sep[1] == len(ids) - 1
    assert batch.token_type_ids[0].tolist() == [0] * (sep[0] + 1) + [1] * (len(ids) - sep[0] - 1)
    assert seq == [-1] + [0] * (sep[0] - 1) + [-1] + [1] * (sep[1] - sep[0] - 1) + [-1]


def test_offsets_locate_an_answer_span_in_the_context(minilm_dir):
    """What extractive QA does with offsets: answer characters -> token span -> characters."""
    ours = load_encoder_tokenizer(minilm_dir)
    question, context = "Who wrote Emma?", CONTEXTS[0]
    start_char = context.index("Jane Austen")
    end_char = start_char + len("Jane Austen")
    batch = ours.encode(question, context)
    seq, offsets = batch.sequence_ids[0], batch.offsets[0]
    inside = (seq == 1) & (offsets[:, 0] >= start_char) & (offsets[:, 1] <= end_char)
    tokens = inside.nonzero().flatten()
    first, last = int(tokens[0]), int(tokens[-1])
    assert context[int(offsets[first, 0]) : int(offsets[last, 1])] == "Jane Austen"


def test_tokenizer_json_padding_settings_are_not_used(minilm_dir):
    """MiniLM's tokenizer.json pads to a fixed 128; a single short text must not be padded."""
    ours = load_encoder_tokenizer(minilm_dir)
    batch = ours.encode("Cats sleep.")
    assert batch.input_ids.shape == (1, 5) and batch.attention_mask.all()
    assert ours.model_max_length == 512
    assert ours.decode(batch.input_ids[0].tolist()) == "cats sleep."


def test_bad_inputs_are_clear_errors(roberta_dir, tmp_path):
    with pytest.raises(StokerError, match="tokenizer not found"):
        load_encoder_tokenizer(tmp_path / "nope")
    with pytest.raises(StokerError, match="no encoder tokenizer in"):
        load_encoder_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(StokerError, match="not a valid tokenizer.json"):
        load_encoder_tokenizer(tmp_path)
    ours = load_encoder_tokenizer(roberta_dir)
    with pytest.raises(ValueError, match="needs max_length"):
        ours.encode("a", padding="max_length")
    with pytest.raises(ValueError, match="2 texts but 1 pairs"):
        ours.encode(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="Truncation error"):
        ours.encode(CONTEXTS[3], "b", max_length=8, truncation="only_second")
    with pytest.raises(ValueError, match="texts is empty"):
        ours.encode([])
    assert isinstance(ours.encode("x").input_ids, torch.Tensor)
