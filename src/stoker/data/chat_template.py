"""Chat templates: a tokenizer directory's Jinja template, rendered as `transformers` does it.

A chat template turns a conversation (a list of `{"role", "content", ...}` messages, plus
optional `tools` and `documents`) into the exact text a chat model was trained on. It lives in
the tokenizer directory, as `chat_template.jinja` (preferred, like transformers ≥ 4.4x) or as
the `chat_template` key of `tokenizer_config.json` (a string, or a list of `{name, template}`
of which `default` is used, or `tool_use` when asked for), or in the older
`chat_template.json` (`{"chat_template": ...}`).

Rendering follows `transformers.utils.chat_template_utils` and
`PreTrainedTokenizerBase.apply_chat_template` (transformers 5.x), without importing them:
- a jinja2 `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
  `loopcontrols` extension and the `{% generation %}...{% endgeneration %}` tag (which marks
  the assistant text a template author wants trained, see `render_tracked`);
- the globals `raise_exception(msg)` (a TemplateError), `strftime_now(fmt)`, a restricted
  `dict` and a `namespace` that refuses underscore attributes; a `tojson` filter that does not
  HTML-escape and takes `ensure_ascii, indent, separators, sort_keys`;
- the variables `messages, tools, documents, add_generation_prompt` and the tokenizer's named
  special tokens (`bos_token eos_token unk_token sep_token pad_token cls_token mask_token`, from
  `tokenizer_config.json`, overridden by `special_tokens_map.json` when the config has no
  `added_tokens_decoder`, as transformers loads them), plus any extra keyword arguments;
- messages are normalised first: keys whose value is None are dropped, and a reasoning field
  (`reasoning_content`, `thinking` or `reasoning`) is copied to `thinking` and
  `reasoning_content`.

`assistant_spans` finds the characters of the rendered text that are assistant output (see its
docstring); `plain_text` is the documented fallback format for prompt/response data when a
tokenizer has no template: Alpaca's prompt format (Taori et al. 2023, Stanford Alpaca).
Templates are code from model authors: the sandbox is what makes rendering them safe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stoker.data.tokenizer import HF_EXTRA_FILES, TOKENIZER_FILES, Tokenizer, copy_hf_tokenizer
from stoker.errors import StokerError, file_errors

TEMPLATE_FILE = "chat_template.jinja"
LEGACY_TEMPLATE_FILE = "chat_template.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' test
Span = tuple[int, int]  # [start, end) character offsets into a rendered text


# ---------------------------------------------------------------------------- environment
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while a tracker is
    active, records the body's character span in the output (transformers' AssistantTracker)."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        environment.extend(track_generation=self.track)
        self._tracking: ContextVar = ContextVar("stoker_generation_tracker", default=None)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _body(self, context: jinja2.nodes.EvalContext, caller: jinja2.runtime.Macro) -> str:
        out = caller()
        tracking = self._tracking.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(map(len, blocks))
            spans.append((start, start + len(out)))
        return out

    @contextmanager
    def track(self, blocks: list[str], spans: list[Span]) -> Iterator[None]:
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):  # jinja's signature trick: `namespace(self=...)`
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace ({name!r})"
            )


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, with nothing else reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached per text); jinja2.TemplateSyntaxError when malformed."""
    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise StokerError(  # older versions have known sandbox escapes; templates are code
            f"chat templates need jinja2>=3.1.6 (have {jinja2.__version__}): pip install -U jinja2"
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_Dict(),
        namespace=_Namespace,
    )
    return env.from_string(source)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies with None-valued keys dropped and reasoning fields aliased (module docstring)."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ---------------------------------------------------------------------------- templates
class ChatTemplate:
    """One template with the special-token variables of its tokenizer."""

    def __init__(
        self, source: str, variables: dict[str, str] | None = None, origin: str = "chat template"
    ):
        self.source, self.origin = source, origin
        self.variables = dict(variables or {})
        self.template = compile_template(source)
        self.has_generation_tags = GENERATION_TAG.search(source) is not None

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """The text `apply_chat_template(messages, tools, documents, tokenize=False, ...)`
        gives; a jinja2.TemplateError when the template refuses the conversation."""
        return self.template.render(
            **self._context(messages, tools, documents, add_generation_prompt, kwargs)
        )

    def render_tracked(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[Span]]:
        """(text, the spans of every `{% generation %}` block), like transformers'
        `return_assistant_tokens_mask`."""
        blocks: list[str] = []
        spans: list[Span] = []
        ctx = self._context(messages, tools, documents, False, kwargs)
        with self.template.environment.track_generation(blocks, spans):
            for block in self.template.generate(**ctx):
                blocks.append(block)
        return "".join(blocks), spans

    def _context(self, messages, tools, documents, add_generation_prompt, kwargs) -> dict:
        return {
            **self.variables,
            **kwargs,
            "messages": normalize_messages(messages),
            "tools": tools,
            "documents": documents,
            "add_generation_prompt": add_generation_prompt,
        }


def _read_json(path: Path) -> dict[str, Any]:
    with file_errors(path, "is not valid JSON", "restore the tokenizer's files"):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise StokerError(f"{path}: is not a JSON object; restore the tokenizer's files")
    return data


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_token_variables(directory: str | Path) -> dict[str, str]:
    """The named special tokens transformers passes to templates, from a tokenizer dir."""
    d = Path(directory)
    config = _read_json(d / CONFIG_FILE) if (d / CONFIG_FILE).is_file() else {}
    found = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_NAMES}
    if (d / SPECIAL_TOKENS_FILE).is_file() and "added_tokens_decoder" not in config:
        legacy = _read_json(d / SPECIAL_TOKENS_FILE)  # the legacy file overrides, as in HF
        found.update({k: _token_text(legacy[k]) for k in SPECIAL_TOKEN_NAMES if k in legacy})
    return {k: v for k, v in found.items() if v is not None}


def find_template_source(directory: str | Path, with_tools: bool = False) -> tuple[str, str] | None:
    """(template text, where it came from) of a tokenizer dir, or None (module docstring)."""
    d = Path(directory)
    if (d / TEMPLATE_FILE).is_file():
        with file_errors(d / TEMPLATE_FILE, "cannot read", "check the file's permissions"):
            return (d / TEMPLATE_FILE).read_text(encoding="utf-8"), str(d / TEMPLATE_FILE)
    for name in (LEGACY_TEMPLATE_FILE, CONFIG_FILE):
        if not (d / name).is_file():
            continue
        value = _read_json(d / name).get("chat_template")
        if isinstance(value, list):  # named templates
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("tool_use") if with_tools and "tool_use" in named else None
            value = value or named.get("default")
            if value is None:
                raise StokerError(
                    f"{d / name}: chat_template lists named templates but none is called "
                    f"'default' (has: {', '.join(map(str, named))}); add one"
                )
        if isinstance(value, str):
            return value, f"{d / name} (chat_template)"
    return None


def tokenizer_dir(path: str | Path) -> Path:
    """The directory whose files describe the tokenizer at `path` (a file's parent; the
    `tokenizer/` of a data dir or checkpoint)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return p.parent
    inner = p / "tokenizer"
    return inner if inner.is_dir() and not (p / "tokenizer.json").is_file() else p


def tokenizer_files(path: str | Path) -> list[Path]:
    """The tokenizer-side files at `path` (the file itself, and those of `tokenizer_dir`)."""
    names = {*TOKENIZER_FILES, *HF_EXTRA_FILES, "encoder.json", "vocab.bpe"}
    files = [Path(path)] if Path(path).is_file() else []
    for f in sorted(tokenizer_dir(path).iterdir()):
        if f.is_file() and (f.name in names or f.suffix in (".tiktoken", ".model")):
            files.append(f)
    return list(dict.fromkeys(files))


def save_tokenizer_dir(tok: Tokenizer, tok_dir: Path, dst: Path, template: str | None) -> None:
    """Every tokenizer-side file of `tok_dir` into `dst` (chat template, pad/unk tokens and
    all), loadable by stoker and transformers, its config naming `tok`'s EOS; `template`, when
    given, becomes chat_template.jinja, which takes precedence over the config's."""
    tok.save(dst)  # tokenizer.json (or .model) + a minimal config, for non-HF sources
    copy_hf_tokenizer(tok_dir, dst)  # the originals (full config with chat_template) on top
    path = dst / CONFIG_FILE
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **json.loads(path.read_bytes())}
    path.write_text(json.dumps({**config, "eos_token": tok.eos_token}, indent=2))
    if template is not None:
        (dst / TEMPLATE_FILE).write_text(template, encoding="utf-8")


def resolve_template(template: str, tok_dir: Path) -> tuple[str, str] | None:
    """(text, origin) for `template` = "auto" | "plain" | a path to a Jinja file."""
    if template == "plain":
        return None
    if template == "auto":
        return find_template_source(tok_dir)
    p = Path(template).expanduser()
    if not p.is_file():
        raise StokerError(
            f"chat template {p} not found; give a .jinja file, 'auto' (the "
            "tokenizer's own) or 'plain'"
        )
    with file_errors(p, "cannot read the chat template", "check the file's permissions"):
        return p.read_text(encoding="utf-8"), str(p)


def load_chat_template(
    directory: str | Path, found: tuple[str, str] | None = None
) -> ChatTemplate | None:
    """The template `found` = (text, origin), else the tokenizer dir's own, with the dir's
    special tokens; None when there is none. A malformed template is a one-line StokerError."""
    found = found or find_template_source(directory)
    if found is None:
        return None
    text, origin = found
    try:
        return ChatTemplate(text, special_token_variables(directory), origin)
    except jinja2.TemplateSyntaxError as e:
        raise StokerError(
            f"{origin}: not a valid Jinja chat template (line {e.lineno}: {e.message}); fix "
            "the template"
        ) from None


# ---------------------------------------------------------------------------- label spans
def _prefix_spans(tpl: ChatTemplate, messages: list[dict], full: str, **kw: Any) -> list[Span]:
    """Span of assistant message i = [len(render(messages[:i], add_generation_prompt)),
    len(render(messages[:i+1]).rstrip())): its content and end-of-turn token, without the
    header the generation prompt already holds and without the whitespace after the end
    token. ValueError when the prefixes are not prefixes of the full text."""
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tpl.render(messages[:i], add_generation_prompt=True, **kw)
        through = tpl.render(messages[: i + 1], **kw).rstrip()
        if not (full.startswith(before) and full.startswith(through)) or len(through) < len(before):
            raise ValueError(f"the template does not render message {i} as a prefix")
        spans.append((len(before), len(through)))
    return spans


def _search_spans(tpl: ChatTemplate, messages: list[dict], full: str, **kw: Any) -> list[Span]:
    """Fallback: each assistant content found verbatim in the full text (in order), extended
    over what the template renders after it when it ends the conversation (its end token)."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"assistant message {i} has no text to locate")
        text = content.strip()
        start = full.find(text, cursor)
        if start < 0:
            raise ValueError(f"assistant message {i} does not appear verbatim in the text")
        end = start + len(text)
        try:
            alone = tpl.render(messages[: i + 1], **kw).rstrip()
            tail = alone[alone.rfind(text) + len(text) :] if text in alone else ""
        except jinja2.TemplateError:
            tail = ""
        if tail and full.startswith(tail, end):
            end += len(tail)
        spans.append((start, end))
        cursor = end
    return spans


def assistant_spans(
    tpl: ChatTemplate,
    messages: list[dict[str, Any]],
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs: Any,
) -> tuple[str, list[Span]]:
    """(the full rendered conversation, the character spans to train on).

    Spans, in order of preference: the `{% generation %}` blocks when the template has them
    (used verbatim); else prefix renders (`_prefix_spans`), which covers templates whose
    rendering of a conversation starts with the rendering of its first messages (ChatML,
    Llama 3, Mistral, ...); else each assistant content located verbatim (`_search_spans`).
    jinja2.TemplateError when the template refuses the conversation, ValueError when no
    method finds the assistant text."""
    kw = {"tools": tools, "documents": documents, **kwargs}
    if tpl.has_generation_tags:
        full, spans = tpl.render_tracked(messages, **kw)
        if not spans:
            raise ValueError("the template's {% generation %} blocks rendered nothing")
        return full, spans
    full = tpl.render(messages, **kw)
    try:
        return full, _prefix_spans(tpl, messages, full, **kw)
    except (ValueError, jinja2.TemplateError):
        try:
            return full, _search_spans(tpl, messages, full, **kw)
        except ValueError as e:
            raise ValueError(
                f"{e}; add {{% generation %}} tags around the assistant text in the template"
            ) from None


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Alpaca's prompt, with or without its `### Input:` section, ending `### Response:\\n`."""
    if input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def plain_text(prompt: str, response: str, eos_token: str) -> tuple[str, list[Span]]:
    """`prompt + response + EOS` and the span of `response + EOS` (no BOS is added)."""
    text = prompt + response + eos_token
    return text, [(len(prompt), len(text))]
