"""The `stoker` command line: parse, load the config, call one function per subcommand.

Exit codes: 0 success, 2 usage/config error (one line on stderr, no traceback), 1 anything
else, 141 when stdout is a pipe whose reader has gone (`stoker count --json | head`): quietly,
the status of a tool killed by SIGPIPE (128 + 13), which `set -o pipefail` scripts already
expect. Heavy imports (torch) happen inside the subcommand functions, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from stoker.errors import StokerError

# subcommand -> (module:function, one-line help). The function takes the parsed namespace
# (plus `overrides`, the list of --section.key=value strings, for recipe commands).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("stoker.train.loop:train_command", "train a recipe (one process, or under torchrun)"),
    "validate": (
        "stoker.validate:validate_command",
        "preflight a recipe: each check of its setup PASS or FAIL",
    ),
    "prepare": (
        "stoker.tasks:prepare_command",
        "corpus -> tokenizer -> token shards for a recipe",
    ),
    "generate": (
        "stoker.generate:generate_command",
        "sample text from a run, checkpoint or HF directory",
    ),
    "eval": (
        "stoker.eval.perplexity:eval_command",
        "validation loss and perplexity of a run or checkpoint",
    ),
    "predict": (
        "stoker.tasks.dynamo.cli:predict_command",
        "route raw text through a DYNAMO run: the chosen task, the gates, the output",
    ),
    "import-hf": (
        "stoker.hf_dirs:import_hf_command",
        "Hugging Face directory -> stoker checkpoint",
    ),
    "export-hf": (
        "stoker.hf_dirs:export_hf_command",
        "stoker run/checkpoint -> transformers-loadable directory",
    ),
    "count": (
        "stoker.scaling.report:count_command",
        "exact params, FLOPs/token and memory of a recipe or preset",
    ),
    "plan": (
        "stoker.scaling.report:plan_command",
        "scaling-law loss, compute-optimal N/D, time and cost on named GPUs",
    ),
    "monitor": (
        "stoker.monitor.commands:monitor_command",
        "live CPU/RAM/GPU readings plus CUDA, bf16, NCCL/gloo checks and advice",
    ),
    "plot": (
        "stoker.monitor.plot:plot_command",
        "PNG of runs' loss, lr, tokens/s, MFU, memory and system utilization",
    ),
    "bench": (
        "stoker.bench:bench_command",
        "tokens/s of stoker's model and data loader vs transformers and nanoGPT",
    ),
}
RECIPE_COMMANDS = {"train", "prepare", "validate"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise StokerError(f"{message} (see `{self.prog} --help`)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (e.g. recipes/pretrain/tiny.yaml)")
    p.epilog = (
        "Any recipe key can be overridden: --train.max_steps=30 --optim.lr=3e-4 "
        "--model.n_layer=4 (values are checked against the schema)."
    )


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run dir (its latest checkpoint) or checkpoint dir")
    p.add_argument("--data-dir", help="token-shard dir to evaluate on (default: the run's)")
    p.add_argument("--split", default="val", help="shard split to evaluate (default: val)")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="number of batches, >= 1 (default: train.eval_steps of the run)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence, >= 1 (default: the run's train.seq_len)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per forward, >= 1 (default: the run's micro-batches)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        default=None,
        help="run lm-evaluation-harness tasks (comma-separated) instead, e.g. "
        "stoker_next_line,stoker_stdlib_ppl (offline, built in) or any lm-eval task",
    )
    p.add_argument(
        "--lm-eval-include",
        metavar="DIR",
        default=None,
        help="with --lm-eval: a directory of extra lm-eval task YAML files",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="with --lm-eval: at most N documents per task"
    )


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run dir, checkpoint dir, or local Hugging Face directory")
    p.add_argument("--prompt", default="", help="text to continue (with --chat: the user message)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="format the prompt with the model's chat template and print only the answer "
        "(stops at EOS or the end-of-turn token; --interactive keeps the conversation)",
    )
    p.add_argument("--system", default=None, help="with --chat: a system message")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="with --chat: a Jinja chat template to use instead of the tokenizer's own",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample (>= 1)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature, >= 0; 0 = greedy"
    )
    p.add_argument("--top-k", type=int, default=None, help="keep the k >= 1 most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (>= 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="weights and KV cache: auto = bf16 on GPUs and CPUs with native bf16 "
        "(AVX512-BF16/AMX; ~1.4x faster there: half the bytes per token), else fp32",
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin in a loop (empty line or EOF quits)",
    )
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="print the text once at the end instead of token by token",
    )


def _add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name in ("train", "prepare", "validate"):
        _add_recipe_args(p)
    if name == "validate":
        from stoker.validate import add_arguments as add_validate_arguments

        add_validate_arguments(p)
    if name == "train":
        p.add_argument("--phase", type=int, action="append", choices=[1, 2, 3],
                       help="multi-phase recipes (dynamo): run only this phase (repeatable); "
                       "the same as --dynamo.phases=[N,...]")  # fmt: skip
    elif name == "eval":
        _add_eval_arguments(p)
    elif name == "generate":
        _add_generate_arguments(p)
    elif name == "predict":
        p.add_argument("path", help="a DYNAMO run dir (its train.out_dir)")
        p.add_argument("--text", required=True, help="the input (a question for QA)")
        p.add_argument("--context", help="the passage a question is about (extractive QA)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    elif name == "import-hf":
        p.add_argument(
            "hf_dir",
            help="local Hugging Face model directory (config.json + safetensors), a .gguf "
            "file (LLaMA family), or a PEFT LoRA adapter directory",
        )
        p.add_argument("out", help="checkpoint directory to create")
        p.add_argument(
            "--base",
            help="a PEFT adapter's base model (default: the one its adapter_config.json names)",
        )
    elif name == "export-hf":
        p.add_argument("path", help="run dir or checkpoint dir")
        p.add_argument("out", help="directory to write (transformers format)")
        p.add_argument(
            "--adapter",
            action="store_true",
            help="a LoRA run: write its adapter "
            "alone as a PEFT directory (default: the model with adapters merged)",
        )
    elif name in ("count", "plan"):
        from stoker.scaling.report import add_arguments

        add_arguments(name, p)
    elif name == "monitor":
        from stoker.monitor.commands import add_arguments as add_monitor_arguments

        add_monitor_arguments(p)
    elif name == "plot":
        from stoker.monitor.plot import add_arguments as add_plot_arguments

        add_plot_arguments(p)
    elif name == "bench":
        from stoker.bench import add_arguments as add_bench_arguments

        add_bench_arguments(p)


def build_parser(selected: str | None = None) -> Parser:
    """The parser; only `selected`'s options are added when given (keeps imports minimal)."""
    parser = Parser(
        prog="stoker",
        description="Train transformer models from a laptop CPU "
        "to a GPU cluster. Each subcommand has --help.",
    )
    from stoker import __version__

    parser.add_argument("--version", action="version", version=f"stoker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if selected in (None, name):
            _add_arguments(name, p)
    return parser


def _call(target: str, args: argparse.Namespace) -> int:
    module, func = target.split(":")
    result = getattr(importlib.import_module(module), func)(args)
    return int(result or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at interpreter exit cannot fail again (the
    recipe of Python's `signal` docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured in tests)
        sys.stdout = os.fdopen(devnull, "w")
    else:
        os.close(devnull)


def _choose_cpu_math(args: argparse.Namespace) -> None:
    """Reproducible CPU math is chosen before torch is imported (stoker/reproducibility.py):
    by `train.deterministic` for training, always for evaluation and sampling."""
    from stoker import reproducibility

    if args.command == "train":
        reproducibility.choose_for_recipe(args.recipe, args.overrides)
    elif args.command in ("eval", "generate", "predict", "validate"):
        reproducibility.choose_cpu_math(True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else "")
        if not argv:
            parser.print_help()
            return 2
        args, extra = parser.parse_known_args(argv)
        if extra and args.command not in RECIPE_COMMANDS:
            raise StokerError(
                f"unrecognized arguments: {' '.join(extra)} (see `stoker {args.command} --help`)"
            )
        args.overrides = extra
        _choose_cpu_math(args)
        code = _call(COMMANDS[args.command][0], args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except StokerError as e:
        # one line, even when the message quotes a path or key that holds a newline
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"stoker: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stoker: interrupted", file=sys.stderr)
        return 130
