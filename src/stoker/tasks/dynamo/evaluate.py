"""DYNAMO's evaluation: each task's metric on held-out records under a routing mode, routing
accuracy and its confusion matrix, and the table `stoker eval RUN` prints.

Routing modes (gates (B, K) for every adapted layer):
- `oracle`: one-hot on the example's true task (phase 1's adapters as trained);
- `soft`: the router's softmax(logits / τ_end); `top1`: one-hot on its argmax;
- `uniform`: 1/K each; `merged`: 1 each, the static merge PEFT's `add_weighted_adapter(...,
  combination_type="cat", weights=[1]*K)` builds from the exported adapters (the sum of every
  adapter's delta); `random`: one-hot on a random task (seeded); `zero`: no adapter (the frozen
  encoder with the trained heads).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stoker.models.dynamo import DynamoModel
from stoker.models.lora_mixture import use_gates
from stoker.tasks.dynamo.batches import eval_batches, to_device

MODES = ("oracle", "soft", "top1", "uniform", "merged", "random", "zero")


def gates_for(m: DynamoModel, batch: dict, mode: str, tau: float) -> torch.Tensor:
    B, K = batch["task"].numel(), m.n_adapters
    device = batch["task"].device
    if mode == "oracle":
        return F.one_hot(batch["task"], K).float()
    if mode in ("soft", "top1"):
        logits = m.route(batch)
        if mode == "soft":
            return torch.softmax(logits.float() / tau, -1)
        return F.one_hot(logits.argmax(-1), K).float()
    if mode == "uniform":
        return torch.full((B, K), 1.0 / K, device=device)
    if mode == "merged":
        return torch.ones(B, K, device=device)
    if mode == "random":
        g = torch.Generator().manual_seed(int(batch["input_ids"][:, :4].sum()))
        return F.one_hot(torch.randint(0, K, (B,), generator=g), K).float().to(device)
    if mode == "zero":
        return torch.zeros(B, K, device=device)
    raise ValueError(f"unknown routing mode {mode}")


def _outputs(m: DynamoModel, task, k: int, mode: str):
    """(head outputs of task k, batch) per eval batch of its held-out features."""
    device = next(m.parameters()).device
    tau = task.cfg.dynamo.router.tau_end
    for b in eval_batches(task.val[k].val_features, task.cfg.train.micro_batch_size,
                          task.tokenizer.pad_id):  # fmt: skip
        b = to_device(b, device)
        out = m(b, gates=gates_for(m, b, mode, tau))
        yield out["outputs"][k], b


@torch.no_grad()
def task_scores(m: DynamoModel, task, k: int, mode: str) -> dict[str, float]:
    """Task k's metrics (0..100) on its held-out records under routing `mode`."""
    from stoker.tasks.dynamo import metrics as M

    t, data = task.cfg.dynamo.tasks[k], task.val[k]
    if t.kind == "classify":
        preds = [p for o, _ in _outputs(m, task, k, mode) for p in o["logits"].argmax(-1).tolist()]
        return {"accuracy": M.accuracy(preds, [r["label"] for r in data.eval_records])}
    if t.kind == "qa":
        from stoker.tasks.dynamo.qa import qa_decode

        starts, ends = [], []
        for o, _ in _outputs(m, task, k, mode):
            starts += list(o["start"].cpu())
            ends += list(o["end"].cpu())
        preds = qa_decode(starts, ends, data.val_features, data.eval_records,
                          max_answer_length=t.max_answer_length)  # fmt: skip
        golds = {r["id"]: [a["text"] for a in r["answers"]] for r in data.eval_records}
        return M.squad_scores(preds, golds)
    texts = generate_texts(m, task, k, data.eval_records, mode)
    refs = [r["target"] for r in data.eval_records]
    scores = M.rouge_scores(texts, refs) | {"bleu": M.bleu_score(texts, refs),
                                            "exact_match": M.exact_match(texts, refs)}  # fmt: skip
    if t.code or t.main_metric == "parse_rate":
        scores["parse_rate"] = M.parse_rate(texts, [r["source"] for r in data.eval_records])
    return scores


def generate_texts(m: DynamoModel, task, k: int, records: list[dict], mode: str) -> list[str]:
    """Decoded targets of task k for `records`, with gates from `mode` chosen per record on
    its source (the router reads the source alone)."""
    from stoker.tasks.dynamo.data import features
    from stoker.tasks.dynamo.seq2seq import code_to_text, generate, text_to_code

    cfg, t = task.cfg, task.cfg.dynamo.tasks[k]
    device = next(m.parameters()).device
    src_only = [{**r, "target": ""} for r in records]
    feats = features(cfg, k, task.tokenizer, src_only)
    gates = torch.cat([gates_for(m, to_device(b, device), mode, cfg.dynamo.router.tau_end)
                       for b in eval_batches(feats, cfg.train.micro_batch_size,
                                             task.tokenizer.pad_id)])  # fmt: skip
    head = m.heads[t.name]

    def logits_fn(ids, types, mask, rows):
        """Logits at each row's last real token (the only position generation reads),
        broadcast over T: (N, T, V) without materializing it."""
        batch = {"input_ids": ids, "token_type_ids": types, "mask": mask}
        hidden = m.encode(batch, gates[rows])  # (N, T, C)
        last = mask.diagonal(dim1=1, dim2=2).sum(1) - 1  # (N,): only real queries see themselves
        logits = head(hidden[torch.arange(len(ids), device=ids.device), last])  # (N, V)
        return logits[:, None].expand(-1, ids.shape[1], -1)  # (N, T, V) view

    cache = m.encoder.new_cache()

    def step_fn(ids, types, positions, mask, read):
        """Logits (N, V) at `read` of the new tokens, all rows, through the cache."""
        with use_gates(m.encoder, gates):
            hidden = m.encoder(ids, token_type_ids=types, attn_mask=mask,
                               position_ids=positions, cache=cache)  # fmt: skip
        return head(hidden[torch.arange(len(ids), device=ids.device), read])  # (N, V)

    text = code_to_text if t.code else (lambda s: s)
    g = cfg.dynamo.generation
    target_type = 1 if cfg.encoder.type_vocab_size > 1 else 0
    out = generate(logits_fn, task.tokenizer, [text(r["source"]) for r in records],
                   t.max_source, min(g.max_new_tokens, t.max_target), g.num_beams,
                   target_type, g.length_penalty, device,
                   cached=(step_fn, m.encoder.embeddings.position_of))  # fmt: skip
    decoded = [
        task.tokenizer.decode(ids) for ids in out
    ]  # code tokens are kept (added, not special)
    return [as_body(text_to_code(s)) if t.code else s for s in decoded]


def as_body(code: str) -> str:
    """Generated code (trained on dedented bodies, seq2seq.code_to_text) indented one level,
    as the body of the prompt's top-level function and as the references are written."""
    import textwrap

    return textwrap.indent(code, "    ")


def _one_per_record(features: list[dict]) -> list[dict]:
    """One feature per held-out record: a long QA context's first window (question and the
    context's start, what raw text would give), every other task's only feature."""
    seen: set[int] = set()
    out = []
    for f in features:
        i = f.get("example_index")
        if i not in seen:
            out.append(f)
        if i is not None:
            seen.add(i)
    return out


@torch.no_grad()
def routing_report(m: DynamoModel, task) -> dict[str, Any]:
    """Routing accuracy (%) over every task's held-out records (one decision per record), the
    confusion matrix (rows:
    true task, columns: chosen adapter) and the mean gate entropy (nats)."""
    K, device = m.n_adapters, next(m.parameters()).device
    confusion = [[0] * K for _ in range(K)]
    entropy, n = 0.0, 0
    for k in task.task_indices:
        for b in eval_batches(_one_per_record(task.val[k].val_features),
                              task.cfg.train.micro_batch_size, task.tokenizer.pad_id):  # fmt: skip
            b = to_device(b, device)
            p = torch.softmax(m.route(b).float() / task.cfg.dynamo.router.tau_end, -1)
            for true, chosen in zip(b["task"].tolist(), p.argmax(-1).tolist(), strict=True):
                confusion[true][chosen] += 1
            entropy += float(-(p * p.clamp_min(1e-12).log()).sum())
            n += b["task"].numel()
    correct = sum(confusion[i][i] for i in range(K))
    return {"routing_accuracy": 100.0 * correct / max(n, 1), "confusion": confusion,
            "gate_entropy": entropy / max(n, 1)}  # fmt: skip


def evaluation_table(m: DynamoModel, task, modes=MODES) -> dict[str, Any]:
    """Every task's main metric under every routing mode, routing, adapter sizes, latency."""
    from stoker.models.lora_mixture import mixture_layers
    from stoker.tasks.dynamo import data as dd

    tasks = task.cfg.dynamo.tasks
    rows, extra, metric = {}, {}, {t.name: t.main_metric for t in tasks}
    for k in task.task_indices:
        rows[tasks[k].name] = {mode: task_scores(m, task, k, mode) for mode in modes}
        held = task.val[k]
        for file in tasks[k].extra_eval:  # the same model on another held-out set
            name = f"{tasks[k].name}/{Path(file).stem}"
            task.val[k] = dd.load_extra(task.cfg, k, task.tokenizer, file)
            try:
                extra[name] = {mode: task_scores(m, task, k, mode) for mode in modes}
                extra[name]["records"] = len(task.val[k].eval_records)
            finally:
                task.val[k] = held
            metric[name] = tasks[k].main_metric
    per_adapter = sum(
        r * (layer.in_features + layer.out_features)
        for layer in mixture_layers(m).values()
        for r in layer.ranks[:1]
    )
    t0, n = time.perf_counter(), 0
    k0 = task.task_indices[0]
    for b in eval_batches(task.val[k0].val_features[:16], 1, task.tokenizer.pad_id):
        b = to_device(b, next(m.parameters()).device)
        m(b, tau=task.cfg.dynamo.router.tau_end)
        n += 1
    latency = (time.perf_counter() - t0) / max(n, 1)
    return {"tasks": rows, "extra": extra, **routing_report(m, task),
            "params_per_adapter": per_adapter, "latency_s": latency, "metric": metric}  # fmt: skip


def print_table(result: dict[str, Any], modes=MODES) -> None:
    names = list(result["tasks"])
    rows = result["tasks"] | result.get("extra", {})
    width = max(14, *(len(n) + 2 for n in rows))
    print(f"{'task':{width}}{'metric':12}" + "".join(f"{m:>9}" for m in modes))
    for name, row in rows.items():
        metric = result["metric"][name]
        cells = "".join(f"{row[m][metric]:>9.1f}" for m in modes)
        n = f"  ({row['records']} records)" if "records" in row else ""
        print(f"{name:{width}}{metric:12}{cells}{n}")
    print(f"routing accuracy {result['routing_accuracy']:.1f}% (chance {100 / len(names):.0f}%),"
          f" gate entropy {result['gate_entropy']:.3f} nats")  # fmt: skip
    print("confusion (rows: true task, columns: chosen adapter):")
    for name, row in zip(names, result["confusion"], strict=True):
        print(f"  {name:14}" + "".join(f"{c:>6}" for c in row))
    print(
        f"parameters per adapter {result['params_per_adapter']:,}; "
        f"latency {1000 * result['latency_s']:.1f} ms per example (routed, batch 1)"
    )
