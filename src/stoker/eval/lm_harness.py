"""An lm-evaluation-harness model for stoker language models (`--model stoker`).

`StokerLM(path=RUN_OR_CKPT)` loads a trained decoder, MoR model, fine-tuned or LoRA run (or a
local HF directory) with its tokenizer, as `stoker generate` does (api.load_model,
api.load_tokenizer), and answers lm-eval's three request types:

- `loglikelihood`: the summed log-probability of each continuation given its context, and
  whether greedy decoding would have produced it. Context and continuation are split as
  lm-eval's HF adapter (`HFLM`) splits them: trailing spaces of the context move to the
  continuation, the whole string is encoded, and the continuation is what follows the
  encoded context (`TemplateLM._encode_pair`); an empty context is the BOS (else EOS) token.
  Requests run longest first, right-padded, `batch_size` per forward; answers come back in
  request order. A right-padded row equals the row alone because attention is causal.
- `loglikelihood_rolling`: a document's loglikelihood over disjoint windows of the model's
  `max_seq_len` tokens, each conditioned on the token before it
  (`get_rolling_token_windows(context_len=1)`, as HFLM does).
- `generate_until`: decoding with the KV cache (generate.py's `generate`), greedy unless the
  task asks to sample, stopping at EOS, at any `until` string, or after `max_gen_toks`;
  contexts are left-truncated to `max_length - max_gen_toks` tokens as HFLM does, and rows
  of equal length are decoded together, so no padding enters a row.

Tokenization is the checkpoint's tokenizer with its own special tokens (a BOS when its
post-processor adds one), the same `tokenizer.json` that `stoker export-hf` writes, so the
token ids equal those HFLM sees on the exported model.

MoR models score with causal threshold routing (`threshold_routing`, what decoding uses):
training-time expert-choice top-k picks tokens over the whole sequence, so a continuation
would change how its own context was routed.

lm-eval finds models by name in its registry; this module registers "stoker" when it is
imported. lm-eval 0.4 has no plugin discovery, so its CLI needs the module imported first:
`stoker-lm-eval --model stoker --model_args path=RUN --tasks ...` (or
`python -m stoker.eval.lm_harness ...`) is lm-eval's own CLI with this module loaded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from stoker.errors import StokerError

DEFAULT_BATCH_SIZE = 8  # what "auto" means here: no memory probing


def _positive_int(name: str, value, default: int | None) -> int | None:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() not in (str(n), f"{n}.0"):
        raise StokerError(f"{name} must be a whole number >= 1, got {value!r}")
    return n


@register_model("stoker")
class StokerLM(TemplateLM):
    """A stoker run, checkpoint or HF directory as an lm-eval model (see the module docstring).

    model_args: `path` (required), `device` (auto), `batch_size` (8; "auto" = 8),
    `max_length` (the model's max_seq_len), `max_gen_toks` (256, as HFLM), `dtype`
    (auto: bf16 on a CUDA GPU that has it, else fp32; or fp32, bf16)."""

    def __init__(
        self,
        path: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        dtype: str = "auto",
        max_batch_size: int | None = None,  # lm-eval passes it; batches here are fixed
        **unknown,
    ):
        super().__init__()
        from stoker.api import load_model, load_tokenizer
        from stoker.train.distributed import pick_device

        if unknown:
            raise StokerError(
                f"unknown model_args {', '.join(sorted(unknown))} for the stoker model; use "
                "path, device, batch_size, max_length, max_gen_toks, dtype"
            )
        if not path:
            raise StokerError("the stoker model needs model_args path=RUN_OR_CHECKPOINT")
        if not Path(path).exists():
            raise StokerError(f"no such run, checkpoint or HF directory: {path}")
        device = device or "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda:0 unless told otherwise; HFLM falls back too
            logging.getLogger(__name__).warning("no CUDA device here: device %s -> auto", device)
            device = "auto"
        self._device = pick_device(device, "device")
        model = load_model(path, self._device).eval()
        if not hasattr(model, "new_cache"):
            raise StokerError(f"{path} holds no language model to score text with")
        if dtype == "auto":
            cuda_bf16 = self._device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = "bf16" if cuda_bf16 else "fp32"
        if dtype not in ("fp32", "bf16"):
            raise StokerError(f"dtype must be auto, fp32 or bf16, got {dtype!r}")
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        if hasattr(model, "threshold_routing"):  # MoR: causal routing, as decoding routes
            model.threshold_routing = True
        self.model = model
        self.tokenizer = load_tokenizer(path)
        self.path = str(path)
        self._batch_size = _positive_int("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        self._max_length = _positive_int("max_length", max_length, model.config.max_seq_len)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks, 256)
        if self.tokenizer.eos_id is None and self.tokenizer.bos_id is None:
            raise StokerError(
                f"the tokenizer of {path} has neither an EOS nor a BOS token; lm-eval needs "
                "one to condition on (set eos_token in its tokenizer_config.json)"
            )

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context or a rolling window starts from: BOS, else EOS."""
        tok = self.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(Path(self.path).resolve()).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw
    ) -> list[int]:
        """The tokenizer's ids with its special tokens, unless told otherwise or `string`
        already starts with the prefix token's text (HFLM.tok_encode)."""
        if add_special_tokens is None:
            prefix = self.tokenizer.decode([self.prefix_token_id])
            add_special_tokens = not string.startswith(prefix)
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kw
    ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is greedy) per (key, context ids,
        continuation ids); longest first in right-padded batches, answers in request order."""
        toks = [ctx + cont for _, ctx, cont in requests]
        order = sorted(range(len(requests)), key=lambda i: (-len(toks[i]), tuple(toks[i])))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        L = self.max_length
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="stoker loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i in batch:
                if not requests[i][1] or not requests[i][2]:
                    raise StokerError("lm-eval sent an empty context or continuation")
                if len(requests[i][2]) > L:
                    raise StokerError(
                        f"a continuation of {len(requests[i][2])} tokens does not fit this "
                        f"model's max_length {L}; choose a task with shorter answers"
                    )
            inps = [toks[i][-(L + 1) :][:-1] for i in batch]  # left-truncated, last dropped
            T = max(len(x) for x in inps)
            x = torch.zeros((len(batch), T), dtype=torch.long)  # right padding: never attended
            for b, ids in enumerate(inps):
                x[b, : len(ids)] = torch.tensor(ids)
            logits = self.model(x.to(self.device))  # (B, T, V)
            for b, i in enumerate(batch):
                key, cont = requests[i][0], requests[i][2]
                n = len(inps[b])
                logp = F.log_softmax(logits[b, n - len(cont) : n].float(), dim=-1)  # (n_c, V)
                target = torch.tensor(cont, device=logp.device)
                greedy = bool((logp.argmax(dim=-1) == target).all())
                answer = (float(logp.gather(-1, target[:, None]).sum()), greedy)
                out[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's loglikelihood over disjoint `max_length` windows (HFLM's)."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, rolling):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, scores, strict=True):
            totals[r] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context until EOS, an `until` string or `max_gen_toks` tokens."""
        eos_text = self.tok_decode([self.eot_token_id], False) if self.eot_token_id else None
        jobs = []  # (request index, context ids, options)
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            n_new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - n_new
            if room < 1:
                raise StokerError(
                    f"max_gen_toks {n_new} leaves no room for a context in this model's "
                    f"{self.max_length} positions; lower max_gen_toks (gen_kwargs or model_args)"
                )
            bos = self.tokenizer.bos_token
            ids = self.tok_encode(context, not (bos and context.startswith(bos)), room)
            if not ids:
                ids = [self.prefix_token_id]
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0)) > 0
            opts = (
                n_new,
                float(kwargs.get("temperature", 0.0)) if sample else 0.0,
                kwargs.get("top_k") if sample else None,
                kwargs.get("top_p") if sample else None,
                tuple(until),
            )
            jobs.append((i, ids, opts))
        # rows decode together only when their lengths and options agree: no padding
        jobs.sort(key=lambda j: (-len(j[1]), repr(j[2]), j[0]))
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(jobs), disable=disable_tqdm, desc="stoker generate_until")
        k = 0
        while k < len(jobs):
            group = [jobs[k]]
            while (
                k + len(group) < len(jobs)
                and len(group) < self.batch_size
                and len(jobs[k + len(group)][1]) == len(jobs[k][1])
                and jobs[k + len(group)][2] == jobs[k][2]
            ):
                group.append(jobs[k + len(group)])
            texts = self._decode_group([j[1] for j in group], group[0][2])
            for (i, _, _), text in zip(group, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            k += len(group)
            bar.update(len(group))
        bar.close()
        return out

    def _decode_group(self, contexts: list[list[int]], opts: tuple) -> list[str]:
        """New text of each (equal-length) context, cut at the first stop string."""
        from stoker.generate import generate

        n_new, temperature, top_k, top_p, until = opts
        x = torch.tensor(contexts, device=self.device)  # (B, T)
        new: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        eos = self.eot_token_id
        for tok in generate(self.model, x, n_new, temperature, top_k, top_p):
            for b, t in enumerate(tok.tolist()):
                if done[b]:
                    continue
                if t == eos:
                    done[b] = True
                    continue
                new[b].append(t)
                text = self.tok_decode(new[b])
                done[b] = any(s and s in text for s in until)
            if all(done):
                break
        return [postprocess_generated_text(self.tok_decode(n), list(until), None) for n in new]


def main() -> None:
    """`stoker-lm-eval ...`: lm-eval's own command line, with the stoker model registered."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except StokerError as e:
        print(f"stoker-lm-eval: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
