"""Conversations with image/audio placeholders -> token ids, labels and the placeholder slots
that phase 2 fills with projected features.

Format of one sample (one user turn, one assistant answer):
    <|user|> \\n  {user content}  <|end|> \\n <|assistant|> \\n  {answer}  <|end|>
Each `<image>` / `<audio>` tag in the user content becomes `n_tokens` copies of that
placeholder's id (LLaVA's splicing: the model replaces their embeddings by the projector's
tokens, in place). A modality the recipe has but the sample lacks gets its slot too, at the
start of the user content, filled with that modality's learned missing embedding — chosen per
sample. Labels (the loss) cover the answer and its closing `<|end|>` only; every sample has at
least one. A tag without its file, or a file without its tag, is an error naming the sample.

`WordTokenizer` is the digits task's: words, numbers and punctuation of the corpus, with the
special tokens above; saved as one JSON file. `describe` turns a conversation into the text
the small LM is pretrained on ("the image shows seven."), so that LoRA later adapts a model
that already knows the words and the answer formats.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from stoker.errors import StokerError

USER, ASSISTANT, END, PAD, UNK = "<|user|>", "<|assistant|>", "<|end|>", "<pad>", "<unk>"
TAGS = {"image": "<image>", "audio": "<audio>"}
SPECIALS = [PAD, UNK, USER, ASSISTANT, END, *TAGS.values(), "\n"]
_TOKEN = re.compile("|".join(re.escape(s) for s in SPECIALS[2:]) + r"|\w+|[^\w\s]")
IGNORE = -100


class WordTokenizer:
    """Words, numbers, punctuation and the special tokens; unknown words map to <unk>."""

    def __init__(self, vocab: list[str]):
        if vocab[: len(SPECIALS)] != SPECIALS:
            raise StokerError("a multimodal tokenizer's vocabulary must start with its special "
                              f"tokens {SPECIALS}")  # fmt: skip
        self.vocab = vocab
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.pad_id, self.unk_id, self.end_id = self.ids[PAD], self.ids[UNK], self.ids[END]
        self.tag_ids = {m: self.ids[t] for m, t in TAGS.items()}

    @classmethod
    def build(cls, texts: list[str]) -> WordTokenizer:
        words = sorted({w for t in texts for w in _TOKEN.findall(t)} - set(SPECIALS))
        return cls(SPECIALS + words)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in _TOKEN.findall(text)]

    def decode(self, ids: list[int]) -> str:
        words = [self.vocab[i] for i in ids if i != self.pad_id]
        return re.sub(r" ([^\w\s<])", r"\1", " ".join(words)).replace(" \n ", "\n").strip()

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"format": "stoker-words", "vocab": self.vocab}))

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        try:
            data = json.loads(path.read_text())
            return cls(list(data["vocab"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StokerError(f"cannot read the multimodal tokenizer {path}: {e}") from None


def turns(record: dict, where: str) -> tuple[str, str]:
    """(user content, answer) of a one-turn conversation record."""
    msgs = record.get("messages")
    roles = [m.get("role") for m in msgs] if isinstance(msgs, list) else None
    if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in msgs):
        raise StokerError(f"{where}: messages must be one user turn then one assistant turn "
                          f"with text content, got roles {roles}")  # fmt: skip
    if not msgs[1]["content"].strip():
        raise StokerError(f"{where}: the assistant's answer is empty (nothing to learn)")
    return msgs[0]["content"], msgs[1]["content"]


def check_tags(record: dict, where: str) -> None:
    user, _ = turns(record, where)
    for m, tag in TAGS.items():
        n = user.count(tag)
        if n > 1:
            raise StokerError(f"{where}: {n} {tag} tags; one per sample")
        if n and not record.get(m):
            raise StokerError(f"{where}: the user turn has {tag} but the sample has no {m} path")
        if record.get(m) and not n:
            raise StokerError(f"{where}: the sample has an {m} path but no {tag} tag in its "
                              "user turn (put the tag where the model should see it)")  # fmt: skip


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]  # IGNORE except on the answer and its <|end|>
    prompt_len: int  # ids[:prompt_len] is the prompt generation starts from


def slot_sizes(modalities: list[str], n_tokens: int | dict[str, int]) -> dict[str, int]:
    return dict(n_tokens) if isinstance(n_tokens, dict) else {m: n_tokens for m in modalities}


def render(tok: WordTokenizer, record: dict, modalities: list[str],
           n_tokens: int | dict[str, int], where: str) -> Sample:  # fmt: skip
    """The ids and labels of one conversation (module docstring); `n_tokens` per slot, or
    per modality."""
    check_tags(record, where)
    user, answer = turns(record, where)
    size = slot_sizes(modalities, n_tokens)
    missing = [m for m in modalities if not record.get(m)]
    user_ids = [tok.tag_ids[m] for m in missing for _ in range(size[m])]
    for piece in tok.encode(user):
        is_tag = next((m for m, i in tok.tag_ids.items() if i == piece), None)
        if is_tag is not None and is_tag not in modalities:
            raise StokerError(f"{where}: {TAGS[is_tag]} but the recipe has no {is_tag} encoder")
        user_ids += [piece] * (size[is_tag] if is_tag else 1)
    nl = tok.ids["\n"]
    prompt = [tok.ids[USER], nl, *user_ids, tok.end_id, nl, tok.ids[ASSISTANT], nl]
    target = [*tok.encode(answer), tok.end_id]
    return Sample(prompt + target, [IGNORE] * len(prompt) + target, len(prompt))


def describe(record: dict, labels: dict[str, dict[str, int]], words: list[str]) -> dict:
    """The conversation with each tag replaced by the words for its file's label (the LM's
    pretraining text): "<image>" -> "the image shows seven.", "<audio>" -> "the voice says
    four."."""
    user, answer = turns(record, "a conversation")
    phrase = {"image": "the image shows {}.", "audio": "the voice says {}."}
    for m, tag in TAGS.items():
        if record.get(m):
            user = user.replace(tag, phrase[m].format(words[labels[m][record[m]]]))
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}  # fmt: skip
