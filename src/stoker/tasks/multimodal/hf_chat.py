"""Phase 2 on a pretrained decoder (`multimodal.lm.init_from`): its own tokenizer and chat
template instead of the digits task's word tokenizer.

A conversation is rendered with the model's template (data/chat_template.py); each `<image>`
/ `<audio>` tag of the user turn becomes the recipe's placeholder token for that modality
(`multimodal.lm.image_token` / `audio_token`: single tokens of the tokenizer, e.g. Qwen2's
`<|image_pad|>`), repeated `n_tokens` times after tokenization, so the projector's tokens
replace their embeddings in place (as chat.py's `render`); a modality the sample lacks gets
its slot at the start of the user turn, filled with the learned missing embedding. Labels
cover the assistant's text as the template's spans give it (`assistant_spans`), so the
template's own end-of-turn token is learned when it lies inside them.
"""

from __future__ import annotations

from pathlib import Path

from stoker.errors import StokerError
from stoker.tasks.multimodal import chat


class HFChat:
    """The tokenizer interface phase 2 uses (`pad_id`, `end_id`, `tag_ids`, `vocab_size`,
    `render`, `decode`) over a local tokenizer.json and its chat template."""

    def __init__(self, tok_dir: Path, tags: dict[str, str]):
        from tokenizers import Tokenizer

        from stoker.data.chat_template import load_chat_template, special_token_variables

        path = tok_dir / "tokenizer.json"
        if not path.is_file():
            raise StokerError(f"multimodal.lm.init_from: {tok_dir} has no tokenizer.json; "
                              "give a model directory with its tokenizer")  # fmt: skip
        self.tok = Tokenizer.from_file(str(path))
        self.template = load_chat_template(tok_dir)
        if self.template is None:
            raise StokerError(f"{tok_dir} has no chat template (tokenizer_config.json "
                              "chat_template); phase 2 renders conversations with it")  # fmt: skip
        self.tags = dict(tags)
        self.tag_ids = {m: self._single(t, f"multimodal.lm.{m}_token") for m, t in tags.items()}
        special = special_token_variables(tok_dir)
        eos = special.get("eos_token")
        self.eos_id = self._single(eos, "the eos token") if eos else None
        pad = special.get("pad_token") or eos
        self.pad_id = self._single(pad, "the pad token") if pad else 0
        self.end_id = self._end_of_turn()
        self.vocab_size = self.tok.get_vocab_size()

    def _single(self, text: str, what: str) -> int:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            extra = [t for t in self.tok.get_added_tokens_decoder().values()][:8]
            raise StokerError(f"{what} {text!r} is {len(ids)} tokens of this tokenizer, not one; "
                              f"use one of its special tokens, e.g. "
                              f"{', '.join(str(t.content) for t in extra)}")  # fmt: skip
        return ids[0]

    def _end_of_turn(self) -> int:
        """The token the template closes an assistant turn with (ChatML's <|im_end|>)."""
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        full = self.template.render(msgs)
        after = full[full.rindex("y") + 1 :]
        ids = self.tok.encode(after, add_special_tokens=False).ids
        if ids:
            return ids[0]
        if self.eos_id is None:
            raise StokerError("the chat template ends an answer with nothing and the "
                              "tokenizer has no eos token: generation could not stop")  # fmt: skip
        return self.eos_id

    def render(self, record: dict, modalities: list[str], n_tokens: int | dict[str, int],
               where: str) -> chat.Sample:  # fmt: skip
        from stoker.data.chat_template import assistant_spans

        chat.check_tags(record, where)
        user, answer = chat.turns(record, where)
        for m, tag in chat.TAGS.items():
            if tag in user and m not in modalities:
                raise StokerError(f"{where}: {tag} but the recipe has no {m} encoder")
            user = user.replace(tag, self.tags.get(m, tag))
        user = "".join(self.tags[m] for m in modalities if not record.get(m)) + user
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        try:
            full, spans = assistant_spans(self.template, msgs)
        except ValueError as e:
            raise StokerError(f"{where}: {e}") from None
        enc = self.tok.encode(full, add_special_tokens=False)
        size = chat.slot_sizes(modalities, n_tokens)
        by_id = {i: size.get(m, 1) for m, i in self.tag_ids.items()}
        ids, labels = [], []
        for i, (a, _) in enumerate(enc.offsets):
            t = enc.ids[i]
            on = any(s0 <= a < s1 for s0, s1 in spans)
            copies = by_id.get(t, 1)
            ids += [t] * copies
            labels += [t if on else chat.IGNORE] * copies
        if all(x == chat.IGNORE for x in labels):
            raise StokerError(f"{where}: the answer has no token under the chat template")
        prompt = next(i for i, x in enumerate(labels) if x != chat.IGNORE)
        return chat.Sample(ids, labels, prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i != self.pad_id], skip_special_tokens=False)


def open_chat(cfg) -> HFChat:
    from stoker.tasks.source import open_source

    src = open_source(cfg.multimodal.lm.init_from, "multimodal.lm.init_from")
    if src.tokenizer is None:
        raise StokerError(f"multimodal.lm.init_from {src.path} carries no tokenizer")
    lm = cfg.multimodal.lm
    return HFChat(Path(src.tokenizer), {"image": lm.image_token, "audio": lm.audio_token})
