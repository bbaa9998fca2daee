"""Sampling with a KV cache: greedy, temperature, top-k, top-p, EOS stop, streaming, chat.

Works for any model with `new_cache(batch, max_len)` and `forward(ids, cache) -> logits`
(the decoders of models/gpt.py, and MoR models). The prompt is run once through the model
to fill the cache (prefill); each new token then costs one single-position forward.

`--chat` formats the prompt with the model's chat template (data/chat_template.py, rendered
as transformers' `apply_chat_template(..., add_generation_prompt=True)` and tokenized without
added special tokens, as transformers does): the prompt is the user message, `--system` an
optional system message, and decoding stops at EOS or at the template's end-of-turn token
(`end_of_turn_token`), which is not printed. `--interactive --chat` keeps the conversation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import torch

from stoker.errors import StokerError, file_errors

if TYPE_CHECKING:
    from stoker.data.chat_template import ChatTemplate


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # minus the row max, in float64: a tiny temperature then sends the other logits to -inf
    # instead of the max to inf (inf - inf = nan), and is not rounded to 0 as in float32
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass of strictly more likely tokens already reaches top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False  # the most likely token always stays (a tiny top_p keeps only it)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield new token ids (B,) one step at a time; stops after EOS (B = 1) or the budget.
    `eos_id` may be several ids (e.g. EOS and a chat template's end-of-turn token)."""
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    B, T = input_ids.shape
    try:
        cache = model.new_cache(B, T + max_new_tokens)
    except (RuntimeError, TypeError) as e:  # "can't allocate memory"; a size past int64
        raise StokerError(
            f"no memory for a KV cache of {T + max_new_tokens:,} positions "
            f"({str(e).strip().splitlines()[0]}); lower --max-new-tokens"
        ) from None
    logits = model(input_ids, cache)[:, -1]  # (B, V)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        yield nxt
        if B == 1 and int(nxt[0]) in stop:
            return
        if i + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache)[:, -1]


def check_prompt(prompt: str, source: str = "--prompt") -> None:
    """Refuse text that is not Unicode, e.g. a non-UTF-8 byte in argv (a lone surrogate)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = f"byte 0x{ord(prompt[e.start]) & 0xFF:02x}"
        raise StokerError(f"{source} is not UTF-8 text ({byte} at character {e.start})") from None


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise StokerError("empty prompt and the tokenizer has no BOS/EOS token; pass --prompt")
        ids = [start]
    return ids


def decode_ids(
    model,
    tokenizer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator,
    stream=None,
    stop_ids: Iterable[int] | None = None,
) -> str:
    """Sample after the prompt `ids` until a stop id (default: the tokenizer's EOS) or the
    budget; the new text, stop token excluded, printed incrementally to `stream` if given."""
    max_len = getattr(model.config, "max_seq_len", None)
    if getattr(model, "embed_positions", None) is not None and len(ids) + max_new_tokens > max_len:
        raise StokerError(
            f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} "
            f"exceeds this model's max_seq_len {max_len}"
        )
    stop = {tokenizer.eos_id} if stop_ids is None else set(stop_ids)
    stop.discard(None)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    new: list[int] = []
    shown = ""
    for tok in generate(model, x, max_new_tokens, temperature, top_k, top_p, stop, generator):
        if int(tok[0]) in stop:
            break
        new.append(int(tok[0]))
        if stream is not None:
            text = tokenizer.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd") and text.startswith(shown):
                stream.write(text[len(shown) :])
                stream.flush()
                shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if stream is not None:
        stream.write(text[len(shown) :] if text.startswith(shown) else "\n" + text)
        stream.write("\n")
        stream.flush()
    return text


def complete(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator,
    stream=None,
) -> str:
    """Generate a continuation of `prompt`; print it incrementally to `stream` if given."""
    opts = (max_new_tokens, temperature, top_k, top_p, generator)
    return decode_ids(model, tokenizer, _prompt_ids(tokenizer, prompt), *opts, stream=stream)


# ---------------------------------------------------------------------------- chat
def load_chat(tok_dir: Path, template_file: str | None, source: str) -> ChatTemplate:
    """The template for `--chat`: `template_file` (a Jinja file) if given, else the tokenizer
    dir's own (`chat_template.jinja` or `chat_template` in tokenizer_config.json), with the
    dir's special tokens; a one-line StokerError when there is none."""
    from stoker.data.chat_template import load_chat_template

    found = None
    if template_file is not None:
        p = Path(template_file).expanduser()
        if not p.is_file():
            raise StokerError(f"--chat-template {p} not found; give a Jinja chat template file")
        with file_errors(p, "cannot read the chat template", "check the file's permissions"):
            found = p.read_text(encoding="utf-8"), str(p)
    chat = load_chat_template(tok_dir, found)
    if chat is None:
        raise StokerError(
            f"the tokenizer of {source} ({tok_dir}) has no chat template (no chat_template.jinja"
            ", no chat_template in tokenizer_config.json); pass --chat-template FILE (a Jinja "
            "chat template), or drop --chat to continue plain text"
        )
    return chat


def end_of_turn_id(chat: ChatTemplate, tokenizer) -> int | None:
    """The special token the template writes right after an assistant message (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`, Mistral's EOS), or None when it writes none."""
    answer = "stoker-answer"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    try:
        text = chat.render(messages)
    except jinja2.TemplateError:
        return None
    tail = text[text.rindex(answer) + len(answer) :].lstrip() if answer in text else ""
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    # a special token: decoded, it is text; skipped as special, it is nothing
    if ids and tokenizer.decode(ids[:1]) and not tokenizer.decode(ids[:1], True):
        return ids[0]
    return None


def chat_prompt_ids(chat: ChatTemplate, tokenizer, messages: list[dict]) -> list[int]:
    """`messages` rendered with the generation prompt and tokenized without added special
    tokens: transformers' `apply_chat_template(messages, add_generation_prompt=True)`."""
    try:
        text = chat.render(messages, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise StokerError(f"{chat.origin}: the template refuses this conversation: {e}") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise StokerError(f"{chat.origin}: the template renders this conversation as nothing")
    return ids


def chat_tokenizer_dir(path: str | Path) -> Path:
    """The tokenizer dir of an HF dir (itself) or of a run or checkpoint (`CKPT/tokenizer`)."""
    from stoker.api import is_hf_dir
    from stoker.train.checkpoint import resolve_checkpoint

    return Path(path) if is_hf_dir(path) else resolve_checkpoint(path) / "tokenizer"


def run_chat(args, model, tokenizer, opts: tuple, stream) -> int:
    """`--chat`: answer `--prompt` (or, with `--interactive`, each stdin line, keeping the
    conversation); print only the answers."""
    chat = load_chat(chat_tokenizer_dir(args.path), args.chat_template, args.path)
    stop = {tokenizer.eos_id, end_of_turn_id(chat, tokenizer)} - {None}
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    prompt = read_prompt() if args.interactive else args.prompt
    while prompt is not None:
        messages.append({"role": "user", "content": prompt})
        ids = chat_prompt_ids(chat, tokenizer, messages)
        answer = decode_ids(model, tokenizer, ids, *opts, stream=stream, stop_ids=stop)
        if stream is None:
            print(answer)
        if not args.interactive:
            break
        messages.append({"role": "assistant", "content": answer})
        prompt = read_prompt()
    return 0


# ---------------------------------------------------------------------------- command
def check_sampling_args(args) -> None:
    """Refuse out-of-range sampling options with a one-line StokerError naming the option."""
    if args.max_new_tokens < 1:
        raise StokerError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise StokerError(
            f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}"
        )
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise StokerError(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise StokerError(f"--top-k must be at least 1, got {args.top_k}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise StokerError(f"--seed must be in [0, 2**63), got {args.seed}")
    check_prompt(args.prompt)
    if not args.chat and (args.system is not None or args.chat_template is not None):
        raise StokerError("--system and --chat-template format a chat; add --chat")
    if args.system is not None:
        check_prompt(args.system, "--system")


def read_prompt() -> str | None:
    """The next line of stdin, after a `> ` prompt; None at EOF or on an empty line."""
    try:
        prompt = input("> ")
    except EOFError:
        return None
    except UnicodeDecodeError as e:
        raise StokerError(f"stdin is not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    if not prompt.strip():
        return None
    check_prompt(prompt, "the prompt")
    return prompt


def generate_command(args) -> int:
    """`stoker generate RUN_OR_CKPT --prompt TEXT ...` (`--chat`: see the module docstring)"""
    from stoker.api import load_model, load_tokenizer
    from stoker.train.distributed import pick_device

    check_sampling_args(args)
    device = pick_device(args.device, "--device")
    if not Path(args.path).exists():
        raise StokerError(f"no such run, checkpoint or HF directory: {args.path}")
    model = load_model(args.path, device).eval()
    dtype = getattr(args, "dtype", "auto")
    if dtype == "auto":
        from stoker.train.precision import decode_dtype

        dtype = decode_dtype(device)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    from stoker.models.decoding import fuse_projections

    fuse_projections(model)  # one GEMV for q/k/v and for gate/up per step (after any cast)
    tokenizer = load_tokenizer(args.path)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = None if args.no_stream else sys.stdout
    opts = (args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator)
    if args.chat:
        return run_chat(args, model, tokenizer, opts, stream)
    if not args.interactive:
        if stream is not None:
            sys.stdout.write(args.prompt)
        text = complete(model, tokenizer, args.prompt, *opts, stream=stream)
        if stream is None:
            print(args.prompt + text)
        return 0
    while (prompt := read_prompt()) is not None:
        text = complete(model, tokenizer, prompt, *opts, stream=stream)
        if stream is None:
            print(text)
    return 0
