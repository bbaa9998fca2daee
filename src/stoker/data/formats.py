"""Tokenizer file formats converted to one Hugging Face `tokenizers.Tokenizer`.

Two BPE vocabularies that predate `tokenizer.json` are rebuilt here as byte-level BPE models
so that every stoker data dir and checkpoint carries a `tokenizer.json`:

- GPT-2's `vocab.json` + `merges.txt` (the original `encoder.json` + `vocab.bpe` names are
  accepted too). Built exactly as `transformers.GPT2TokenizerFast` builds it; parity is tested.
- A `.tiktoken` file (one `base64(token_bytes) rank` per line). The file holds ranks only, so the
  merges are recovered by replaying tiktoken's BPE on each token up to its own rank (the method
  of `transformers.convert_slow_tokenizer.TikTokenConverter`), and the pre-tokenization regex
  and special tokens are those of OpenAI's encoding of the same size (or `pattern`).

SentencePiece `.model` files are not converted: see `SentencePieceTokenizer` in tokenizer.py.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from stoker.errors import StokerError

ENDOFTEXT = "<|endoftext|>"
# OpenAI's pre-tokenization regexes (tiktoken_ext/openai_public.py), Oniguruma-compatible.
R50K_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# number of ranks in the file -> (name, regex, special tokens)
KNOWN_TIKTOKEN: dict[int, tuple[str, str, dict[str, int]]] = {
    50256: ("r50k_base/gpt2", R50K_PATTERN, {ENDOFTEXT: 50256}),
    50280: ("p50k_base", R50K_PATTERN, {ENDOFTEXT: 50256}),
    100256: (
        "cl100k_base",
        CL100K_PATTERN,
        {
            ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    199998: ("o200k_base", O200K_PATTERN, {ENDOFTEXT: 199999, "<|endofprompt|>": 200018}),
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level(tok: HFTokenizer, regex: str | None) -> HFTokenizer:
    if regex is None:  # GPT-2's own regex, built into the ByteLevel pre-tokenizer
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def find_gpt2_files(directory: Path) -> tuple[Path, Path] | None:
    """(vocab, merges) in a directory, under the `transformers` or the original OpenAI names."""
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (directory / vocab).is_file() and (directory / merges).is_file():
            return directory / vocab, directory / merges
    return None


def build_gpt2_bpe(vocab_file: Path, merges_file: Path) -> HFTokenizer:
    """GPT-2's byte-level BPE from `vocab.json` + `merges.txt`, as `GPT2TokenizerFast` has it."""
    try:
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        merges = []
        for line in Path(merges_file).read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            left, _, right = line.partition(" ")
            merges.append((left, right))
    except (OSError, ValueError) as e:
        raise StokerError(f"cannot read GPT-2 BPE files {vocab_file}, {merges_file}: {e}") from None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    _byte_level(tok, None)
    if ENDOFTEXT in vocab:
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True)])
    return tok


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """A `.tiktoken` file: `base64(token) rank` per line."""
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise StokerError(f"{path}: not a .tiktoken file ({e})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # binascii.Error is a ValueError
            raise StokerError(f"{path} line {lineno}: not a .tiktoken line ({e})") from None
    if not ranks:
        raise StokerError(f"{path}: empty .tiktoken file")
    return ranks


def _tiktoken_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token`, using only merges ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def build_tiktoken_bpe(path: Path, pattern: str | None = None) -> HFTokenizer:
    """A `.tiktoken` file as a byte-level BPE with tiktoken's ids (merges by rank)."""
    ranks = read_tiktoken(path)
    known = KNOWN_TIKTOKEN.get(len(ranks))
    if pattern is None and known is None:
        raise StokerError(
            f"{path} has {len(ranks)} tokens, not the size of an OpenAI encoding "
            f"({', '.join(f'{n}: {v[0]}' for n, v in KNOWN_TIKTOKEN.items())}); "
            "set data.tokenizer.pattern to its pre-tokenization regex"
        )
    specials = known[2] if known else {}
    enc = bytes_to_unicode()
    as_str = lambda b: "".join(enc[x] for x in b)
    vocab = {as_str(b): r for b, r in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pieces = _tiktoken_split(ranks, token, rank)
        if len(pieces) == 2:
            merges.append((as_str(pieces[0]), as_str(pieces[1])))
    vocab.update(specials)  # keep tiktoken's ids for special tokens (there may be gaps)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    _byte_level(tok, pattern or known[1])
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok
