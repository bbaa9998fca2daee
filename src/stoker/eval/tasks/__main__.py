"""`python -m stoker.eval.tasks OUT_DIR [--n N] [--docs N] [--seed S]`: write the offline
lm-eval tasks (stoker/eval/tasks/__init__.py) into OUT_DIR, for `--include_path OUT_DIR`."""

from __future__ import annotations

import argparse
import sys

from stoker.errors import StokerError
from stoker.eval.tasks import TASKS, build_tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stoker.eval.tasks", description=__doc__)
    p.add_argument("out_dir", help="directory to write the JSONL and YAML files into")
    p.add_argument("--n", type=int, default=200, help="next-line questions (default 200)")
    p.add_argument("--docs", type=int, default=20, help="perplexity documents (default 20)")
    p.add_argument("--seed", type=int, default=0, help="draw seed (default 0)")
    args = p.parse_args(argv)
    try:
        if args.n < 1 or args.docs < 1:
            raise StokerError("--n and --docs must be at least 1")
        out = build_tasks(args.out_dir, args.n, args.docs, args.seed)
    except StokerError as e:
        print(f"stoker: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(TASKS)} to {out} (lm-eval --include_path {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
