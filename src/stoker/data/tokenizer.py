"""Tokenizers: one wrapper around a Hugging Face `tokenizers.Tokenizer`, saved as a directory.

A tokenizer directory holds `tokenizer.json` (the `tokenizers` format) and
`tokenizer_config.json` (`eos_token`, `bos_token`; the keys `transformers` reads), so every
stoker checkpoint's `tokenizer/` folder also loads with `transformers.AutoTokenizer`. A
tokenizer that came from an HF directory keeps all of that directory's tokenizer-side files
(the full config with its chat template and pad/unk tokens, special_tokens_map.json,
chat_template.jinja, ...) through prepare, checkpoints and export (`copy_tokenizer_files`).

Sources a tokenizer can come from (`load_tokenizer_from`, `data.tokenizer.path`):
- a `tokenizer.json` file, or a directory holding one (an HF model dir, a stoker checkpoint's
  `tokenizer/`, a stoker data dir);
- a GPT-2 directory with `vocab.json` + `merges.txt` (or `encoder.json` + `vocab.bpe`);
- a `.tiktoken` file;
- a SentencePiece `.model` (or a directory with `tokenizer.model`).
The first three become a `tokenizers.Tokenizer` (see formats.py). SentencePiece stays
SentencePiece (`SentencePieceTokenizer`, saved as `tokenizer.model`): a converted `tokenizers`
model is not guaranteed to give sentencepiece's ids, and those ids are what the weights expect.
Or `train_bpe` trains a byte-level BPE on the corpus (the default).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from stoker.data.formats import ENDOFTEXT, build_gpt2_bpe, build_tiktoken_bpe, find_gpt2_files
from stoker.errors import StokerError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# tokenizer-side files of HF directories that a checkpoint's tokenizer/ carries along
HF_EXTRA_FILES = ("added_tokens.json", "chat_template.jinja", "chat_template.json")
# tried in order when neither the config nor the tokenizer's own files name the EOS token
EOS_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _declared_specials(directory: Path) -> tuple[str | None, str | None]:
    """(eos, bos) named by `tokenizer_config.json` or `special_tokens_map.json`, if any."""
    eos = bos = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        f = directory / name
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise StokerError(f"unreadable {f}: {e}") from None
            eos = _token_str(meta.get("eos_token")) or eos
            bos = _token_str(meta.get("bos_token")) or bos
    return eos, bos


class Tokenizer:
    """Text <-> ids, with the EOS (and optional BOS) token ids the trainer and sampler need."""

    main_file = "tokenizer.json"  # the file that defines the vocabulary (meta.json names it)

    def __init__(
        self, tok: HFTokenizer, eos_token: str | None = None, bos_token: str | None = None
    ):
        self.tok = tok
        self._vocab_size: int | None = None
        self._set_specials(eos_token, bos_token)

    def _set_specials(self, eos_token: str | None, bos_token: str | None) -> None:
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.bos_id = self.token_to_id(bos_token) if bos_token else None

    def with_specials(self, eos_token: str | None, bos_token: str | None) -> Tokenizer:
        """A copy that uses other EOS/BOS tokens (same vocabulary)."""
        new = copy.copy(self)
        new._set_specials(eos_token, bos_token)
        return new

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """1 + the largest id (ids may have gaps, e.g. tiktoken's special tokens)."""
        if self._vocab_size is None:
            ids = self.tok.get_vocab(with_added_tokens=True).values()
            self._vocab_size = max(
                self.tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1
            )
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (the `tokenizers` Rust thread pool)."""
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets
        return [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _write_files(self, d: Path) -> dict:
        try:
            self.tok.save(str(d / "tokenizer.json"))
        except Exception as e:
            if type(e) is Exception:  # what `tokenizers` raises for a failed write
                raise OSError(str(e)) from e
            raise
        return {"tokenizer_class": "PreTrainedTokenizerFast"}

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = self._write_files(d)
        meta.update(eos_token=self.eos_token, bos_token=self.bos_token)
        (d / "tokenizer_config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a saved tokenizer dir: `tokenizer.json` or `tokenizer.model` (+ config for
        EOS/BOS)."""
        d = Path(directory)
        eos, bos = _declared_specials(d)
        if (d / "tokenizer.json").is_file():
            return Tokenizer(_read_tokenizer_json(d / "tokenizer.json"), eos, bos)
        if (d / "tokenizer.model").is_file():
            return SentencePieceTokenizer(d / "tokenizer.model", eos, bos)
        raise StokerError(f"no tokenizer.json in {d}; point at a directory that holds one")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`, used as is: its ids are sentencepiece's ids by construction."""

    main_file = "tokenizer.model"

    def __init__(
        self, model_file: str | Path, eos_token: str | None = None, bos_token: str | None = None
    ):
        try:
            import sentencepiece as spm
        except ImportError:
            raise StokerError(
                "SentencePiece .model tokenizers need the sentencepiece package: "
                "pip install sentencepiece (or stoker[hf])"
            ) from None
        self.model_proto = Path(model_file).read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError) as e:
            raise StokerError(f"{model_file} is not a SentencePiece model: {e}") from None
        self.tok = None
        self._vocab_size = self.sp.get_piece_size()
        own = lambda i: self.sp.id_to_piece(i) if i >= 0 else None
        self._set_specials(eos_token or own(self.sp.eos_id()), bos_token or own(self.sp.bos_id()))

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # unknown pieces map to <unk>

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if add_special_tokens and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        out = self.sp.encode(texts, num_threads=os.cpu_count() or 1)
        if add_special_tokens and self.bos_id is not None:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if not self.sp.is_control(i)]
        return self.sp.decode(list(ids))

    def _write_files(self, d: Path) -> dict:
        (d / "tokenizer.model").write_bytes(self.model_proto)
        return {"tokenizer_class": "LlamaTokenizer", "stoker_backend": "sentencepiece"}


def _read_tokenizer_json(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise StokerError(
            f"{path} is not a valid tokenizer.json: {str(e).splitlines()[0]}"
        ) from None


def _load_format(p: Path, pattern: str | None) -> tuple[Tokenizer, str | None, str | None]:
    """(tokenizer, declared eos, declared bos) for any supported path."""
    if p.is_dir():
        if (p / "tokenizer").is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
            p = p / "tokenizer"  # a stoker data dir or checkpoint
        eos, bos = _declared_specials(p)
        gpt2 = find_gpt2_files(p)
        tiktoken_files = sorted(p.glob("*.tiktoken"))
        if (p / "tokenizer.json").is_file():
            return Tokenizer(_read_tokenizer_json(p / "tokenizer.json")), eos, bos
        if gpt2:
            return Tokenizer(build_gpt2_bpe(*gpt2)), eos, bos
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model", eos, bos), eos, bos
        if len(tiktoken_files) == 1:
            return Tokenizer(build_tiktoken_bpe(tiktoken_files[0], pattern)), eos, bos
        raise StokerError(
            f"no tokenizer in {p}: expected tokenizer.json, vocab.json + merges.txt, "
            "tokenizer.model or one .tiktoken file"
        )
    eos, bos = _declared_specials(p.parent)
    if p.suffix == ".json":
        return Tokenizer(_read_tokenizer_json(p)), eos, bos
    if p.suffix == ".tiktoken":
        return Tokenizer(build_tiktoken_bpe(p, pattern)), None, None
    if p.suffix == ".model" or p.name.startswith("tokenizer.model"):
        return SentencePieceTokenizer(p), None, None
    raise StokerError(
        f"unknown tokenizer file {p}: expected tokenizer.json, a .tiktoken file, "
        "a SentencePiece .model, or a directory"
    )


def load_tokenizer_from(
    path: str | Path, eos_token: str | None = None, pattern: str | None = None
) -> Tokenizer:
    """Any supported tokenizer file or dir (module docstring), with its EOS token resolved:
    `eos_token` if given (must be in the vocabulary), else the one its files declare, else the
    first of EOS_CANDIDATES it has. `pattern` is the regex for a `.tiktoken` of unknown size."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StokerError(f"data.tokenizer.path not found: {p}")
    tok, declared_eos, declared_bos = _load_format(p, pattern)
    if eos_token is not None:
        if tok.token_to_id(eos_token) is None:
            raise StokerError(
                f"data.tokenizer.eos_token {eos_token!r} is not in the vocabulary "
                f"of {p}; set it to one of its special tokens"
            )
        chosen = eos_token
    else:
        own = [declared_eos, tok.eos_token, *EOS_CANDIDATES]
        chosen = next((t for t in own if t and tok.token_to_id(t) is not None), None)
    return tok.with_specials(chosen, declared_bos or tok.bos_token)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    eos_token: str | None = None,
    show_progress: bool | None = None,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenization) with Hugging Face `tokenizers`.

    Special tokens get the first ids; `eos_token` (default `<|endoftext|>`) is one of them.
    The vocabulary may come out smaller than `vocab_size` on a tiny corpus.
    """
    eos = eos_token or ENDOFTEXT
    specials = list(dict.fromkeys([eos, *special_tokens]))
    least = 256 + len(specials)
    if vocab_size < least:
        raise StokerError(
            f"data.tokenizer.vocab_size={vocab_size} is too small for a byte-level "
            f"BPE: it needs at least {least} (256 bytes + {len(specials)} special "
            "tokens)"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, eos, None)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> bool:
    """Copy every tokenizer-side file of the directory `src` into `dst`: the vocabulary, the
    full tokenizer_config.json (chat_template, pad/unk/bos/eos, added_tokens_decoder),
    special_tokens_map.json, HF_EXTRA_FILES (chat_template.jinja, added_tokens.json, ...),
    `.tiktoken`/`.model` files (data/chat_template.py's `tokenizer_files`); True when there
    was a tokenizer."""
    from stoker.data.chat_template import tokenizer_files  # it imports this module

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return False
    files = tokenizer_files(src)
    if not any(f.name in TOKENIZER_FILES or f.suffix in (".tiktoken", ".model") for f in files):
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    return True


def copy_hf_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Tokenizer files of an HF directory (or a checkpoint's tokenizer/) `src` into `dst`, as
    `copy_tokenizer_files` (so transformers' tokenizer of `dst` keeps the chat template and
    special tokens). A GPT-2 `vocab.json` + `merges.txt` or a `.tiktoken` without
    `tokenizer.json` also gets the equivalent `tokenizer.json` (stoker's own converter); a
    SentencePiece `tokenizer.model` stays as it is (loaded natively)."""
    src, dst = Path(src), Path(dst)
    if not copy_tokenizer_files(src, dst):
        return
    if not (dst / "tokenizer.json").is_file() and not (dst / "tokenizer.model").is_file():
        # Unreadable: carry the raw files anyway; the weights still import.
        with contextlib.suppress(StokerError):
            load_tokenizer_from(src).tok.save(str(dst / "tokenizer.json"))
