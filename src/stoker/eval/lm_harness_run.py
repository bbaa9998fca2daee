"""`stoker eval RUN --lm-eval TASKS`: lm-evaluation-harness tasks on a stoker model.

The model is eval/lm_harness.py's `StokerLM`; the tasks are lm-eval's own, those of
`--lm-eval-include DIR` (YAML files), and stoker's offline ones (eval/tasks), built in the
stoker cache the first time one is asked for. lm-eval is imported only here, so a missing
install is a one-line error with the fix.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from stoker.errors import StokerError

INSTALL = "pip install 'stoker[lmeval]' (or: pip install 'lm-eval>=0.4')"


def _task_manager(tasks: list[str], include: str | None):
    """A TaskManager that knows every task in `tasks`: without lm-eval's own ~200 task
    folders when `include` and stoker's tasks hold them all (indexing those takes seconds)."""
    from lm_eval.tasks import TaskManager

    from stoker.eval.tasks import ensure_tasks

    paths = []
    if include is not None:
        if not Path(include).is_dir():
            raise StokerError(
                f"--lm-eval-include {include} is not a directory; give a directory of "
                "lm-eval task YAML files"
            )
        paths.append(str(Path(include).resolve()))
    paths.append(str(ensure_tasks()))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise StokerError(
            f"unknown lm-eval task {', '.join(unknown)}; {hint}list them with "
            "`lm-eval ls tasks`, or pass --lm-eval-include DIR holding its YAML"
        )
    return manager


def _check_args(args) -> list[str]:
    tasks = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
    if not tasks:
        raise StokerError("--lm-eval needs task names, e.g. --lm-eval stoker_next_line")
    for name, value in (
        ("--data-dir", args.data_dir),
        ("--batches", args.batches),
        ("--seq-len", getattr(args, "seq_len", None)),
    ):
        if value is not None:
            raise StokerError(f"{name} sets the shard evaluation; drop it with --lm-eval")
    if args.limit is not None and args.limit < 1:
        raise StokerError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise StokerError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not Path(args.path).exists():
        raise StokerError(f"no such run, checkpoint or HF directory: {args.path}")
    return tasks


def run_lm_eval(
    path: str,
    tasks: list[str],
    include: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
) -> dict:
    """lm-eval's `simple_evaluate` result dict for `tasks` on the model at `path`."""
    try:
        import lm_eval
    except ImportError:
        raise StokerError(f"--lm-eval needs lm-evaluation-harness: {INSTALL}") from None
    from stoker.eval.lm_harness import StokerLM
    from stoker.train.distributed import pick_device

    dev = pick_device(device, "--device")  # a named device must exist (no CPU fallback)
    manager = _task_manager(tasks, include)
    lm = StokerLM(path=path, device=str(dev), batch_size=batch_size)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False
    )


def lm_eval_command(args) -> int:
    """Print lm-eval's results table (or, with --json, one JSON object)."""
    tasks = _check_args(args)
    results = run_lm_eval(
        args.path,
        tasks,
        args.lm_eval_include,
        args.limit,
        args.batch_size,
        getattr(args, "device", "auto"),
    )
    if args.json:
        keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
        print(json.dumps({k: results[k] for k in keep if k in results}, default=str))
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0
