"""Tokenizers: one wrapper around a Hugging Face `tokenizers.Tokenizer`, saved as a directory.

A tokenizer directory holds `tokenizer.json` (the `tokenizers` format) and
`tokenizer_config.json` (`eos_token`, `bos_token`; the keys `transformers` reads), so every
stoker checkpoint's `tokenizer/` folder also loads with `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from stoker.errors import StokerError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> ids, with the EOS (and optional BOS) token ids the trainer and sampler need."""

    def __init__(self, tok: HFTokenizer, eos_token: str | None = None,
                 bos_token: str | None = None):
        self.tok = tok
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        meta = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                "bos_token": self.bos_token}
        (d / "tokenizer_config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a directory with `tokenizer.json` (+ `tokenizer_config.json` for EOS/BOS)."""
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise StokerError(f"no tokenizer.json in {d}; point at a directory that holds one")
        tok = HFTokenizer.from_file(str(path))
        eos = bos = None
        cfg = d / "tokenizer_config.json"
        if cfg.is_file():
            meta = json.loads(cfg.read_text())
            eos, bos = _token_str(meta.get("eos_token")), _token_str(meta.get("bos_token"))
        return cls(tok, eos, bos)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> bool:
    """Copy whatever tokenizer files `src` holds into `dst`; True when there was a tokenizer."""
    src, dst = Path(src), Path(dst)
    found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not found:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy2(src / f, dst / f)
    return True
