"""Write the offline multimodal task "digits you see and digits you hear".

    python scripts/multimodal_data.py OUT_DIR [--seed N]

Setup tooling, not part of the stoker package. Images are scikit-learn's bundled `load_digits`;
speech is synthesized by espeak-ng (Debian `espeak-ng`; `make test` installs it where apt-get
runs as root). It writes OUT_DIR/images/*.png, OUT_DIR/audio/*.wav, align-{train,test}.jsonl
(phase 1 pairs), chat-{train,test}.jsonl (phase 2 conversations, paths relative to the file)
and manifest.json (counts). See stoker.tasks.multimodal.sources for what each holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from stoker.errors import StokerError
from stoker.tasks.multimodal.sources import build_digits


def build(out: Path, seed: int = 1234) -> dict:
    """Build into a temp dir beside `out`, then move it into place (no half-built dir)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        manifest = build_digits(tmp, seed)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = build(args.out_dir, args.seed)
    except (OSError, StokerError) as e:
        print(f"multimodal_data: error: {e}", file=sys.stderr)
        return 1
    for name, n in manifest.items():
        print(f"{name:12} {n}")
    print(f"wrote {args.out_dir}/ ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
