"""tasks/multimodal/chat.py: slots at the tags (and for absent modalities), labels on the
answer only, the tag/file checks, and the described text the LM pretrains on."""

from __future__ import annotations

import pytest

from stoker.errors import StokerError
from stoker.tasks.multimodal.chat import IGNORE, WordTokenizer, describe, render

REC = {"image": "images/0001.png", "type": "image",
       "messages": [{"role": "user", "content": "<image>\nWhich digit is shown?"},
                    {"role": "assistant", "content": "7"}]}  # fmt: skip


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer.build(["Which digit is shown?", "7", "the image shows seven.",
                                "Is it the same?", "yes"])  # fmt: skip


def test_slots_at_tags_and_for_absent_modalities_and_labels_on_the_answer(tok):
    s = render(tok, REC, ["image", "audio"], 3, "r")
    img, aud = tok.tag_ids["image"], tok.tag_ids["audio"]
    assert s.ids.count(img) == 3 and s.ids.count(aud) == 3  # audio absent: its slot anyway
    assert s.ids.index(aud) < s.ids.index(img)  # the absent one first, the tag in place
    supervised = [t for t in s.labels if t != IGNORE]
    assert (
        tok.decode(supervised) == "7 <|end|>"
        and s.labels[: s.prompt_len] == [IGNORE] * s.prompt_len
    )
    assert tok.decode(s.ids[: s.prompt_len]).endswith("<|assistant|>")
    assert render(tok, REC, ["image"], 2, "r").ids.count(aud) == 0


def test_tags_and_files_must_agree(tok):
    no_file = {**REC, "image": None}
    with pytest.raises(StokerError, match="r: the user turn has <image> but the sample has no"):
        render(tok, no_file, ["image"], 2, "r")
    no_tag = {**REC, "audio": "a.wav"}
    with pytest.raises(StokerError, match="an audio path but no <audio> tag"):
        render(tok, no_tag, ["image", "audio"], 2, "r")
    with pytest.raises(StokerError, match="no image encoder"):
        render(tok, REC, ["audio"], 2, "r")
    empty = {**REC, "messages": [REC["messages"][0], {"role": "assistant", "content": " "}]}
    with pytest.raises(StokerError, match="answer is empty"):
        render(tok, empty, ["image"], 2, "r")
    with pytest.raises(StokerError, match="one user turn then one assistant turn"):
        render(tok, {**REC, "messages": REC["messages"][:1]}, ["image"], 2, "r")


def test_describe_names_the_files_digit(tok):
    d = describe(REC, {"image": {"images/0001.png": 7}, "audio": {}}, [str(i) for i in range(10)])
    assert d["messages"][0]["content"] == "the image shows 7.\nWhich digit is shown?"
    assert tok.decode(tok.encode("the image shows seven.")) == "the image shows seven."
    assert tok.encode("unheard words") == [tok.unk_id, tok.unk_id]
