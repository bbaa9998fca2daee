"""Encoder tokenizers: BERT WordPiece and RoBERTa byte-level BPE, for classification and QA.

An `EncoderTokenizer` wraps a Hugging Face `tokenizers.Tokenizer` and encodes one text or a
text pair per example into padded tensors (`EncoderBatch`): input ids with the special tokens
(`[CLS] a [SEP] b [SEP]` or `<s> a </s></s> b </s>`), the attention mask, token type ids (BERT:
0 for the first text and its specials, 1 for the second; RoBERTa: all 0), character offsets
of every token into the text it came from (extractive QA maps answer spans through them), and
which text each token came from. Truncation is special-token aware (the `tokenizers`
strategies `longest_first`, `only_first`, `only_second`); padding goes to the longest example
or to `max_length`. Ids and offsets equal `transformers`' fast tokenizers' (tested).

Sources (`load_encoder_tokenizer`): a `tokenizer.json` file or a directory holding one (its
own normalizer, pre-tokenizer and template; padding/truncation saved in the file are dropped),
a BERT directory with `vocab.txt`, or a RoBERTa directory with `vocab.json` + `merges.txt`.
The last two are built as `transformers`' `BertTokenizer` / `RobertaTokenizer` build them,
with the options their `tokenizer_config.json` sets (`do_lower_case`, `strip_accents`,
`tokenize_chinese_chars`, `add_prefix_space`, `trim_offsets`). Special tokens come from
`tokenizer_config.json` / `special_tokens_map.json`, else BERT's or RoBERTa's defaults.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from stoker.errors import StokerError, file_errors

SPECIAL_KEYS = ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token")
BERT_SPECIALS = dict(zip(SPECIAL_KEYS, ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"), strict=True))
ROBERTA_SPECIALS = dict(zip(SPECIAL_KEYS, ("<s>", "</s>", "<pad>", "<unk>", "<mask>"), strict=True))
Truncation = Literal["longest_first", "only_first", "only_second"]
_NO_LIMIT = 10**6  # transformers writes model_max_length=1e30 for "no limit"


@dataclass(frozen=True)
class EncoderBatch:
    """One padded batch; every tensor is int64 and (B, T) unless noted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # 1 = real token (specials included), 0 = pad
    token_type_ids: torch.Tensor
    offsets: torch.Tensor  # (B, T, 2) [start, end) characters; (0, 0) for specials and pads
    sequence_ids: torch.Tensor  # 0 = first text, 1 = second, -1 = special or pad


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with file_errors(path, "is not valid JSON", "restore it from the model's source"):
        data = json.loads(path.read_bytes())
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _tokenizer_options(d: Path) -> dict[str, Any]:
    """`special_tokens_map.json` overlaid by `tokenizer_config.json`, specials as strings."""
    meta = {**_read_json(d / "special_tokens_map.json"), **_read_json(d / "tokenizer_config.json")}
    return {k: (_token_str(v) if k in SPECIAL_KEYS else v) for k, v in meta.items()}


def _specials(tok: HFTokenizer, options: dict[str, Any]) -> dict[str, str]:
    defaults = BERT_SPECIALS if tok.token_to_id("[CLS]") is not None else ROBERTA_SPECIALS
    return {k: options.get(k) or defaults[k] for k in SPECIAL_KEYS}


def _add_specials(tok: HFTokenizer, specials: dict[str, str]) -> None:
    """Register the special tokens as `transformers` does: matched in raw text, never split."""
    present = [t for t in dict.fromkeys(specials.values()) if tok.token_to_id(t) is not None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])


def _template(tok: HFTokenizer, specials: dict[str, str], options: dict[str, Any]):
    """BERT's `[CLS] $A [SEP] $B:1 [SEP]:1` for WordPiece, RoBERTa's processor for BPE."""
    cls, sep = specials["cls_token"], specials["sep_token"]
    ids = {t: tok.token_to_id(t) for t in (cls, sep)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise StokerError(f"the tokenizer has no {missing[0]!r} token; an encoder needs it")
    if isinstance(tok.model, models.WordPiece):
        return processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])],
        )
    return processors.RobertaProcessing(
        (sep, ids[sep]),
        (cls, ids[cls]),
        trim_offsets=bool(options.get("trim_offsets", True)),
        add_prefix_space=bool(options.get("add_prefix_space", False)),
    )


def _build_wordpiece(d: Path, options: dict[str, Any]) -> HFTokenizer:
    """`vocab.txt` -> the tokenizer `transformers.BertTokenizer` builds from it."""
    unk = options.get("unk_token") or BERT_SPECIALS["unk_token"]
    with file_errors(d / "vocab.txt", "is not a readable WordPiece vocabulary", "restore it"):
        vocab = models.WordPiece.read_file(str(d / "vocab.txt"))
    tok = HFTokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(options.get("tokenize_chinese_chars", True)),
        strip_accents=options.get("strip_accents"),
        lowercase=bool(options.get("do_lower_case", True)),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _build_byte_bpe(d: Path, options: dict[str, Any]) -> HFTokenizer:
    """`vocab.json` + `merges.txt` -> the tokenizer `transformers.RobertaTokenizer` builds."""
    fix = "restore vocab.json and merges.txt from the model's source"
    with file_errors(d, "holds an unreadable vocab.json / merges.txt", fix, also=(Exception,)):
        vocab, merges = models.BPE.read_file(str(d / "vocab.json"), str(d / "merges.txt"))
    bpe = models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                     fuse_unk=False)  # fmt: skip
    tok = HFTokenizer(bpe)
    prefix = bool(options.get("add_prefix_space", False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix)
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise StokerError(
            f"{path} is not a valid tokenizer.json: {str(e).splitlines()[0]}"
        ) from None


class EncoderTokenizer:
    """Text (pairs) -> `EncoderBatch`; ids -> text. `tok` must carry its post-processor.
    `encode` sets truncation/padding on `tok` for the call: one instance per thread."""

    def __init__(self, tok: HFTokenizer, specials: dict[str, str],
                 model_max_length: int | None = None):  # fmt: skip
        self.tok = tok
        self.specials = specials
        self.model_max_length = model_max_length
        self.pad_id = self._id("pad_token")
        self.cls_id, self.sep_id = self._id("cls_token"), self._id("sep_token")
        self.mask_id = tok.token_to_id(specials["mask_token"])
        tok.no_padding()
        tok.no_truncation()

    def _id(self, key: str) -> int:
        i = self.tok.token_to_id(self.specials[key])
        if i is None:
            raise StokerError(
                f"the tokenizer has no {key} {self.specials[key]!r} in its vocabulary; "
                f"name the right one in tokenizer_config.json"
            )
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(
        self,
        texts: str | Sequence[str],
        pairs: str | Sequence[str] | None = None,
        *,
        max_length: int | None = None,
        truncation: Truncation = "longest_first",
        padding: Literal["longest", "max_length"] = "longest",
    ) -> EncoderBatch:
        """Encode texts (or text pairs) with special tokens. `max_length` truncates (special
        tokens included) by the `truncation` strategy; `padding="max_length"` pads to it."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("nothing to encode: texts is empty")
        pairs = [pairs] if isinstance(pairs, str) else pairs
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        inputs = texts if pairs is None else list(zip(texts, pairs, strict=True))
        if max_length is not None:
            self.tok.enable_truncation(max_length, strategy=truncation)
        length = max_length if padding == "max_length" else None
        self.tok.enable_padding(pad_id=self.pad_id, pad_token=self.specials["pad_token"],
                                length=length)  # fmt: skip
        try:
            encodings = self.tok.encode_batch(inputs, add_special_tokens=True)
        except Exception as e:  # tokenizers' truncation errors are bare Exceptions
            raise ValueError(f"cannot encode: {str(e).splitlines()[0]}") from None
        finally:
            self.tok.no_truncation()
            self.tok.no_padding()
        seq = [[-1 if s is None else s for s in e.sequence_ids] for e in encodings]
        return EncoderBatch(
            input_ids=torch.tensor([e.ids for e in encodings]),  # (B, T)
            attention_mask=torch.tensor([e.attention_mask for e in encodings]),  # (B, T)
            token_type_ids=torch.tensor([e.type_ids for e in encodings]),  # (B, T)
            offsets=torch.tensor([e.offsets for e in encodings]).view(len(texts), -1, 2),
            sequence_ids=torch.tensor(seq),  # (B, T)
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_encoder_tokenizer(path: str | Path) -> EncoderTokenizer:
    """A BERT/RoBERTa tokenizer from a `tokenizer.json` file or a directory (module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StokerError(f"tokenizer not found: {p}")
    d = p if p.is_dir() else p.parent
    options = _tokenizer_options(d)
    if p.is_file() or (d / "tokenizer.json").is_file():
        tok = _read_tokenizer_json(p if p.is_file() else d / "tokenizer.json")
    elif (d / "vocab.txt").is_file():
        tok = _build_wordpiece(d, options)
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tok = _build_byte_bpe(d, options)
    else:
        raise StokerError(
            f"no encoder tokenizer in {d}: expected tokenizer.json, vocab.txt (BERT) "
            "or vocab.json + merges.txt (RoBERTa)"
        )
    specials = _specials(tok, options)
    if not (p.is_file() or (d / "tokenizer.json").is_file()):  # a tokenizer.json lists its own
        _add_specials(tok, specials)
    if tok.post_processor is None:
        tok.post_processor = _template(tok, specials, options)
    limit = options.get("model_max_length")
    limit = int(limit) if isinstance(limit, (int, float)) and limit < _NO_LIMIT else None
    return EncoderTokenizer(tok, specials, limit)
