"""The multimodal JSONL readers: every bad file is a one-line StokerError naming it."""

import pytest

from stoker.errors import StokerError
from stoker.tasks.multimodal.data import read_rows


def test_non_utf8_bad_json_and_missing_keys_name_the_file(tmp_path):
    path = tmp_path / "chat-train.jsonl"
    path.write_bytes(b'{"messages": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(StokerError, match="chat-train.jsonl is not readable UTF-8"):
        read_rows(path, ("messages",))
    path.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(StokerError, match="line 2: not JSON"):
        read_rows(path, ("messages",))
    path.write_text('{"image": "a.png"}\n')
    with pytest.raises(StokerError, match="line 1: no messages"):
        read_rows(path, ("messages",))
    with pytest.raises(StokerError, match="not found"):
        read_rows(tmp_path / "nope.jsonl", ("messages",))
