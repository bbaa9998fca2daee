"""`stoker validate RECIPE [--quick] [--json F] [--only NAME ...]`: a behavioural preflight of
any recipe (pretrain, MoR, fine-tune, DYNAMO, multimodal) before a long job.

The checks (validate/checks.py) run the recipe's own task — the code the loop runs — on its
config: config (schema, paths, the task reads its data), init (parameter table), data (every
sample supervised, labels on the response only), freezing (after optimizer steps every frozen
tensor is bitwise unchanged, every trainable one that got a gradient changed, frozen modules
in eval), forward (finite, ≈ ln V for a fresh head), step (every trainable tensor a gradient,
no frozen one), checkpoint (save → scrambled fresh model → load: identical outputs; trainable
keys only where the task saves those), tracking (the run's metrics read back, from MLflow when
it is on) and short run (the loss on one batch at least halves). Each is PASS, FAIL or SKIP
(a check it needs did not pass), with its time and a one-line detail; any FAIL exits 1.

A multi-stage recipe is checked stage by stage in order; a stage that passes is trained
through the loop (its quick steps, or 2 at full shapes) so the next stage has the result it
builds on. Everything is
written under a temp dir, removed at the end. `--quick` shrinks the recipe first
(validate/quick.py): tiny shapes, stand-ins for absent corpora and pretrained weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stoker.errors import StokerError
from stoker.validate.checks import CHECKS, NEEDS, ORDER, Failed, Probe


@dataclass
class Result:
    unit: str  # the stage ("" for a one-run recipe)
    check: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


def _one_line(e: BaseException) -> str:
    if isinstance(e, Failed | StokerError):
        text = str(e)
    else:  # a bug or an unexpected state: where it happened, in one line
        where = traceback.extract_tb(e.__traceback__)[-1]
        text = f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"
    return " ".join(text.split()) or type(e).__name__


def selected(only: list[str] | None) -> list[str]:
    """The checks to run, in order: `only` and what they need."""
    if not only:
        return list(ORDER)
    unknown = [n for n in only if n not in CHECKS]
    if unknown:
        raise StokerError(f"--only {unknown[0]}: no such check; the checks are {', '.join(ORDER)}")
    want: set[str] = set()

    def add(name: str) -> None:
        if name not in want:
            want.add(name)
            for need in NEEDS[name]:
                add(need)

    for name in only:
        add(name)
    return [n for n in ORDER if n in want]


def check_unit(unit: str, cfg: Any, work: Path, names: list[str], say, quick: bool = False,
               full: Any = None) -> list[Result]:  # fmt: skip
    probe, results, passed = Probe(cfg, work, quick), [], set()
    probe.unit, probe.full = unit, full
    for name in names:
        missing = [n for n in NEEDS[name] if n not in passed]
        if missing:
            r = Result(unit, name, "SKIP", 0.0, f"needs {missing[0]}, which did not pass")
        else:
            start = time.perf_counter()
            try:
                detail, status = CHECKS[name](probe), "PASS"
                passed.add(name)
            except Exception as e:  # every failure is a finding, never a traceback
                detail, status = _one_line(e), "FAIL"
            r = Result(unit, name, status, time.perf_counter() - start, detail)
        results.append(r)
        say(r)
    return results


def _materialize(stage: Any, quick: bool) -> None:
    """Train a stage that passed (its result is what the next stage reads): its quick steps,
    or 2 at full shapes."""
    from stoker.train import stages as S
    from stoker.train.loop import train

    cfg = stage.cfg.model_copy(deep=True)
    if not quick:
        cfg.train.max_steps = min(cfg.train.max_steps, 2)
    S.write_marker(stage, done=False)
    log = io.StringIO()  # the loop's own report; its last line if it fails
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            summary = train(cfg)
    except Exception:
        lines = [x for x in log.getvalue().splitlines() if x.strip()]
        if lines:
            print(lines[-1])
        raise
    S.write_marker(stage, done=True, summary=summary)


def _train_stage(stage: Any, after: str, quick: bool, say) -> Result:
    """Train a stage that passed, for the next one (`after`)."""
    step = Result(stage.name, "train", "PASS", 0.0, "")
    start = time.perf_counter()
    try:
        _materialize(stage, quick)
        steps = stage.cfg.train.max_steps if quick else min(stage.cfg.train.max_steps, 2)
        step.detail = f"{steps} steps, for {after}"
    except Exception as e:
        step.status, step.detail = "FAIL", _one_line(e)
    step.seconds = time.perf_counter() - start
    say(step)
    return step


def _check_stages(stages: list, names: list[str], work: Path, say, quick: bool, full: Any
                  ) -> list[Result]:  # fmt: skip
    """Each stage's checks in order; a stage that passes trains for the next; one that
    fails skips the rest."""
    results: list[Result] = []
    for i, stage in enumerate(stages):
        mine = [n for n in names if n != "tracking" or i == 0]  # one tracker: checked once
        unit = check_unit(stage.name, stage.cfg, work / f"probe-{i}", mine, say, quick, full)
        results += unit
        if i + 1 == len(stages):
            break
        if all(r.status == "PASS" for r in unit):
            step = _train_stage(stage, stages[i + 1].name, quick, say)
        else:
            step = Result(stage.name, "train", "SKIP", 0.0, "a check failed")
            say(step)
        results.append(step)
        if step.status != "PASS":
            for later in stages[i + 1 :]:
                results.append(Result(later.name, "(all)", "SKIP", 0.0,
                                      f"needs stage {stage.name}"))  # fmt: skip
                say(results[-1])
            break
    return results


def run_validation(recipe: str, overrides: list[str], quick: bool, only: list[str] | None,
                   say=lambda r: None) -> tuple[list[Result], list[str]]:  # fmt: skip
    """The results of every selected check, stage by stage; and the quick stand-ins."""
    from stoker.config import load_config
    from stoker.tasks import task_class

    names = selected(only)
    work = Path(tempfile.mkdtemp(prefix="stoker-validate-"))
    try:
        try:
            cfg = load_config(recipe, overrides)
            said: list[str] = []
            full = cfg if quick else None
            if quick:
                from stoker.validate.quick import quick_config

                cfg, said = quick_config(cfg, work)
            else:
                cfg = cfg.model_copy(deep=True)
                cfg.train.out_dir = str(work / "run")
            stages = task_class(cfg).stages(cfg)
        except Exception as e:
            r = Result("", "config", "FAIL", 0.0, _one_line(e))
            say(r)
            rest = [Result("", n, "SKIP", 0.0, "needs config, which did not pass")
                    for n in names[1:]]  # fmt: skip
            for x in rest:
                say(x)
            return [r, *rest], []
        if stages is None:
            return check_unit("", cfg, work / "probe", names, say, quick, full), said
        return _check_stages(stages, names, work, say, quick, full), said
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_row(r: Result) -> None:
    unit = f"{r.unit:<20} " if r.unit else ""
    print(f"  {unit}{r.check:<13} {r.status:<4} {r.seconds:6.2f}s  {r.detail}", flush=True)


def add_arguments(p) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and stand-ins for absent data/weights (seconds on a CPU)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help=f"these checks (and those they need): {' '.join(ORDER)}")  # fmt: skip


def validate_command(args) -> int:
    """The CLI: print each check as it ends; exit 1 on any FAIL."""
    mode = "quick: tiny shapes, temp dir" if args.quick else "full shapes, temp dir"
    print(f"stoker validate {args.recipe} ({mode})", flush=True)
    start = time.perf_counter()
    results, said = run_validation(args.recipe, list(args.overrides or []), args.quick,
                                   args.only, _print_row)  # fmt: skip
    for line in said:
        print(f"  stand-in: {line}")
    failed = [r for r in results if r.status == "FAIL"]
    n_pass = sum(r.status == "PASS" for r in results)
    print(f"stoker validate: {'FAIL' if failed else 'PASS'} — {n_pass} passed, {len(failed)} "
          f"failed, {sum(r.status == 'SKIP' for r in results)} skipped in "
          f"{time.perf_counter() - start:.1f}s")  # fmt: skip
    if args.json:
        report = {"recipe": args.recipe, "quick": args.quick, "passed": not failed,
                  "stand_ins": said, "checks": [asdict(r) for r in results]}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0
