"""What one `stoker bench` worker process measures (`python -m stoker.bench_workers SPEC`
prints `RESULT {json}`): the two models built with the same weights, timed training steps
(eager or under `torch.compile`), greedy decoding, the matmul rate, and the data loaders on a
synthetic shard dir. The methods and the peers are described in `stoker.bench`. torch is
imported inside the functions, so the parent process (and `stoker bench --help`) can import
this module without it.

The spec's `device` (cpu or cuda) holds the models, inputs, KV caches and optimizer state; CUDA
kernels run asynchronously, so every timed region starts and ends with `synchronizer(device)`
(a no-op on CPU). The data loaders are host code and never touch the device.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stoker.monitor.system import cpu_name

if TYPE_CHECKING:
    from stoker.config import ModelConfig

BATCH, PROMPT, NEW_TOKENS = 8, 32, 128
MATMUL_N = {"cpu": 2048, "cuda": 8192}  # matmul side per device: 2048 is too small for a GPU
DATA_BATCHES = 1000  # batches per timed round of the data mode
MISSING = "transformers not installed"
COMPILED = "-compile"  # suffix of the training modes whose model runs under torch.compile


def train_variant(mode: str) -> tuple[str, bool]:
    """(dtype, compiled) of a training mode: `bf16-compile` -> ("bf16", True)."""
    return mode.removesuffix(COMPILED), mode.endswith(COMPILED)


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading the clock: wait for queued CUDA kernels; nothing on CPU."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else lambda: None


def device_name(device: str) -> str:
    """The GPU's name on CUDA (as `scaling.hardware` looks it up), else the CPU model."""
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


# ------------------------------------------------------------------------------ models
def model_config(preset: str) -> ModelConfig:
    from stoker.config import ModelConfig

    return ModelConfig(preset=preset)


def decode_lengths(cfg: ModelConfig) -> tuple[int, int]:
    """(prompt, new tokens) of the decode mode, within the model's context."""
    prompt = min(PROMPT, cfg.max_seq_len // 4)
    return prompt, min(NEW_TOKENS, cfg.max_seq_len - prompt)


def build(
    impl: str, cfg: ModelConfig, device: str = "cpu", use_compile: bool = False
) -> tuple[Any, Callable[..., Any]]:
    """(model on `device`, loss(ids, targets)) with each impl's own loss code; transformers gets
    a copy of stoker's initial weights (made on CPU, so the same on every device) through the
    project's converter. stoker's loss is the model's own (`forward(ids, targets=...)`, as
    `stoker train` calls it: with `train.fused_loss: auto`, the fused head + cross-entropy
    under autocast on CUDA). With
    `use_compile` the loss calls `torch.compile(model)`, as each side's trainer does: `stoker
    train --train.compile=true` compiles the model, whose forward then computes head + loss
    in the graph; HF Trainer's `torch_compile=True` has accelerate wrap the model in
    `torch.compile` (inductor, default mode), the loss computed inside the model's forward."""
    import torch

    from stoker.models.gpt import build_model

    torch.manual_seed(0)
    ours = build_model(cfg)
    if impl == "stoker":
        from stoker.models.loss import use_fused_loss

        ours = ours.to(device)
        use_fused_loss(ours, "auto", torch.device(device))  # as `stoker train` sets it
        fwd = torch.compile(ours) if use_compile else ours

        def stoker_loss(ids, targets):  # what tasks/lm.py runs: the model's head + loss
            total, count = fwd(ids, targets=targets)
            return total / count

        return ours, stoker_loss
    from transformers import AutoConfig, AutoModelForCausalLM

    from stoker.models.hf import hf_config_from, state_dict_to_hf

    fields = hf_config_from(cfg)
    fields.pop("architectures")
    # no special tokens: generate() must neither stop early nor pad
    fields.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    keys = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=False)
    tied = ["lm_head.weight"] if cfg.tie_embeddings else []  # tied by from_config
    if keys.unexpected_keys or keys.missing_keys != tied:
        raise RuntimeError(f"weights do not match the transformers model: {keys}")
    hf = hf.to(device)
    call = torch.compile(hf) if use_compile else hf

    def hf_loss(ids, targets):  # HF's causal-LM loss; the targets are shifted already
        return call(input_ids=ids, labels=targets, shift_labels=targets, use_cache=False).loss

    return hf, hf_loss


# ----------------------------------------------------------------------------- workers
def run_matmul(dtype_name: str, reps: int, device: str = "cpu") -> float:
    """FLOP/s of the best of `reps` n² matmuls in `dtype_name` on `device` (n: MATMUL_N).
    fp32 on CUDA runs as torch's TF32 setting says (left at its default; the worker reports
    it)."""
    import torch

    from stoker.train.telemetry import matmul_rate

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    warmup = 2 if device == "cpu" else 10  # a GPU also settles its clocks
    return matmul_rate(MATMUL_N[device], dtype, device, repeats=reps, warmup=warmup)


def run_train(
    impl: str, mode: str, cfg: ModelConfig, warmup: int, steps: int, device: str = "cpu"
) -> dict[str, Any]:
    """Median step time after `warmup` steps (their total is `warmup_s`: in the compiled modes
    it includes compiling the forward and backward graphs). `timed_graphs`: graphs dynamo
    compiled during the timed steps (recompilation; 0 when the warmup covered it)."""
    import contextlib

    import torch
    from torch._dynamo.utils import counters

    dtype, compiled = train_variant(mode)
    model, loss_fn = build(impl, cfg, device, use_compile=compiled)
    model.train()
    from stoker.config import OptimConfig
    from stoker.train.optim import build_optimizer, param_groups

    ocfg = OptimConfig(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if impl == "stoker":  # what `stoker train` builds: fused AdamW on CPU and CUDA
        opt = build_optimizer(model, ocfg, device)
    else:  # HF Trainer's default for torch >= 2.8 (`adamw_torch_fused`), same decay groups
        opt = torch.optim.AdamW(
            param_groups(model, ocfg.weight_decay),
            lr=ocfg.lr,
            betas=ocfg.betas,
            eps=ocfg.eps,
            fused=True,
        )
    T, gen = cfg.max_seq_len, torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (BATCH, T + 1), generator=gen).to(device)
    ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T) each
    bf16 = lambda: torch.autocast(device, dtype=torch.bfloat16)
    autocast = bf16 if dtype == "bf16" else contextlib.nullcontext
    times, losses, graphs, sync = [], [], 0, synchronizer(device)
    for i in range(warmup + steps):
        if i == warmup:
            graphs = counters["stats"]["unique_graphs"]
        sync()
        t0 = time.perf_counter()
        with autocast():
            loss = loss_fn(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = statistics.median(times[warmup:])
    result = {"tokens_per_s": BATCH * T / step_s, "step_s": step_s, "loss0": losses[0]}
    result["timed_graphs"] = counters["stats"]["unique_graphs"] - graphs
    result |= {"warmup_steps": warmup, "warmup_s": sum(times[:warmup])}
    return result | {"step_times": times[warmup:]}


def run_decode(
    impl: str,
    cfg: ModelConfig,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    auto_dtype: bool = False,
) -> dict[str, Any]:
    """Greedy decoding speed; stoker's model prepared as `stoker generate` prepares it
    (`fuse_projections`); with `auto_dtype` in `--dtype auto`'s dtype (its fp32 tokens from
    one untimed run come back as `tokens_fp32`)."""
    import torch

    from stoker.generate import generate
    from stoker.models.decoding import fuse_projections
    from stoker.train.precision import decode_dtype

    model, _ = build(impl, cfg, device)
    model.eval()
    (n_prompt, n_new), gen = decode_lengths(cfg), torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (1, n_prompt), generator=gen).to(device)
    extra: dict[str, Any] = {"dtype": "fp32"}
    if impl == "stoker":  # generate yields (B,) ids one step at a time
        decode = lambda: torch.stack(list(generate(model, prompt, n_new, temperature=0.0)), 1)
        if auto_dtype:
            extra["tokens_fp32"] = decode()[0].tolist()
            extra["dtype"] = decode_dtype(torch.device(device))
            model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[extra["dtype"]])
        fuse_projections(model)  # as `stoker generate` prepares the model
    else:
        decode = lambda: model.generate(
            prompt, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new
        )[:, n_prompt:]
    times, sync = [], synchronizer(device)
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            out = decode()  # (1, n_new)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    if out.shape != (1, n_new):
        raise RuntimeError(f"{impl} decoded shape {tuple(out.shape)}, expected (1, {n_new})")
    t = statistics.median(times)
    result = {"tokens_per_s": n_new / t, "seconds": t, "times": times, "tokens": out[0].tolist()}
    return result | extra


def write_shards(directory: Path, vocab_size: int, tokens: int, seed: int = 0) -> None:
    """A token-shard dir as `stoker prepare` leaves one (data/shards.py): uniform random ids,
    the train split in one shard, a small val split, a tokenizer dir, meta.json written last."""
    import numpy as np

    from stoker.data import shards

    dtype = shards.choose_dtype(vocab_size)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", tokens), ("val", max(tokens // 64, 1024))):
        writer = shards.ShardWriter(directory, split, dtype, shard_tokens=n)
        writer.write(rng.integers(0, vocab_size, n, dtype=shards.DTYPES[dtype]), documents=1)
        splits[split] = writer.summary()
    (directory / shards.TOKENIZER_DIR).mkdir()
    meta = dict(format=shards.FORMAT, version=shards.VERSION, vocab_size=vocab_size, dtype=dtype)
    meta.update(tokenizer_dir=shards.TOKENIZER_DIR, splits=splits, seed=seed)
    meta.update(sources=["stoker bench: uniform random token ids"])
    (directory / shards.META_FILE).write_text(json.dumps(meta, indent=2))


def nanogpt_get_batch(
    path: Path, dtype: str, block_size: int, batch_size: int
) -> Callable[[int], tuple[Any, Any]]:
    """nanoGPT's `get_batch` (train.py) on CPU, as a user would copy it into a script."""
    import numpy as np
    import torch

    def get_batch(_step: int):
        # nanoGPT re-creates the memmap every batch to avoid a memory leak
        data = np.memmap(path, dtype=dtype, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix]
        )
        return x, y

    return get_batch


def run_data(
    impl: str, cfg: ModelConfig, data_dir: str, warmup: int, rounds: int
) -> dict[str, Any]:
    import torch

    from stoker.data.loader import TokenWindows

    T = cfg.max_seq_len
    windows = TokenWindows(data_dir, "train", T, BATCH, seed=0)
    if impl == "stoker":
        get_batch = windows.batch
    else:
        torch.manual_seed(0)
        path = Path(data_dir) / windows.meta["splits"]["train"]["shards"][0]["file"]
        get_batch = nanogpt_get_batch(path, windows.meta["dtype"], T, BATCH)
    rates = []
    for r in range(warmup + rounds):
        t0 = time.perf_counter()
        for i in range(DATA_BATCHES):
            x, y = get_batch(r * DATA_BATCHES + i)  # (B, T) each
        if r >= warmup:
            rates.append(DATA_BATCHES * BATCH * T / (time.perf_counter() - t0))
    if x.shape != (BATCH, T) or y.shape != (BATCH, T) or x.dtype != torch.int64:
        raise RuntimeError(f"{impl} loader gave {tuple(x.shape)} {x.dtype}")
    return {"tokens_per_s": statistics.median(rates), "rates": rates}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (impl, mode) measurement in this process; `spec` comes from `bench.run_all`. The
    device is named after the measurement (on CUDA that initializes it, not in the data mode's
    timed loop)."""
    impl, mode, versions = spec["impl"], spec["mode"], {}
    if impl == "transformers":
        try:
            import transformers
        except ImportError:
            return {"missing": MISSING}
        versions["transformers"] = transformers.__version__
    import torch

    torch.set_num_threads(spec["threads"])  # on CUDA: the host-side ops only
    warmup, steps, device = spec["warmup"], spec["steps"], spec["device"]
    if impl == "matmul":
        reps = 5 if spec["quick"] else 10
        result: dict[str, Any] = {d: run_matmul(d, reps, device) for d in spec["dtypes"]}
        if device == "cuda":  # torch's default, not set here: say which the fp32 rate used
            result["tf32"] = torch.backends.cuda.matmul.allow_tf32
    elif mode.startswith("decode"):
        auto = mode == "decode-auto"
        result = run_decode(impl, model_config(spec["preset"]), warmup, steps, device, auto)
    elif mode == "data":
        result = run_data(impl, model_config(spec["preset"]), spec["data_dir"], warmup, steps)
    else:
        result = run_train(impl, mode, model_config(spec["preset"]), warmup, steps, device)
    result |= {"device": device, "device_name": device_name(device), "host": cpu_name()}
    return {**result, **versions, "threads": torch.get_num_threads(), "torch": torch.__version__}


if __name__ == "__main__":
    print("RESULT " + json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
