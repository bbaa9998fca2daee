"""Checkpoints at scale: FSDP2 saves sharded (each rank its own DCP shard file, nothing
gathered), resumes on 2 and on 1 process with the losses of an uninterrupted run, each rank
reads only its own shards; ddp/zero1 resumes read the files on rank 0 only; every layout
resumes under every strategy; export-hf consolidates a sharded checkpoint to the weights an
unsharded run gives (and bitwise to torch's own DCP converter)."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.train.conftest import BASE, losses
from tests.train.test_distributed import _free_port

from stoker.api import build_model, load_model
from stoker.cli import main
from stoker.config import load_config
from stoker.errors import StokerError
from stoker.train.loop import train
from stoker.train.sharded import load_model_state_dict, materialize

pytestmark = pytest.mark.slow

STEPS = [
    "--train.max_steps=8",
    "--train.eval_interval=0",
    "--train.save_interval=4",
    "--train.micro_batch_size=4",
]

# Runs stoker's CLI in its process and records, for files under $WATCH: every Python-level
# open (audit hook: builtins.open, os.open, pathlib, torch.load of a path), every safetensors
# open (Rust, so wrapped), and every chunk DCP's FileSystemReader reads (fqn, file, offset,
# length), the unit DCP reads: a rank that reads a chunk reads all of that chunk's bytes.
RECORDER = """
import json, os, sys, faulthandler
faulthandler.dump_traceback_later(240, exit=True)  # a hang shows every thread's stack
watch, log = os.environ["WATCH"], os.environ["READ_LOG"]
rank = os.environ.get("RANK", "0")
record = {"opened": [], "read": []}

def seen(path):
    try:
        path = os.path.realpath(os.fsdecode(path))
    except TypeError:
        return
    if path.startswith(watch + os.sep):
        record["opened"].append(os.path.relpath(path, watch))

sys.addaudithook(lambda event, args: seen(args[0]) if event == "open" else None)
import safetensors, safetensors.torch
plain_open = safetensors.safe_open
def safe_open(filename, *a, **k):
    seen(filename)
    return plain_open(filename, *a, **k)
safetensors.safe_open = safetensors.torch.safe_open = safe_open
from torch.distributed.checkpoint import FileSystemReader
plain_read = FileSystemReader.read_data
def read_data(self, plan, planner):
    for item in plan.items:
        where = self.storage_data[item.storage_index]
        record["read"].append([item.storage_index.fqn, where.relative_path, where.offset,
                               where.length])
    return plain_read(self, plan, planner)
FileSystemReader.read_data = read_data
from stoker.cli import main
code = main(sys.argv[1:])
with open(os.path.join(log, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
sys.exit(code)
"""


def run_stoker(args: list[str], tmp: Path, nproc: int, watch: Path | None = None) -> dict:
    """`stoker train` in `nproc` processes (torchrun when > 1); returns the recorder's log per
    rank when `watch` is given, and the run's stdout under "stdout"."""
    tmp.mkdir(parents=True, exist_ok=True)
    recipe, script, log = tmp / "r.yaml", tmp / "recorder.py", tmp / "reads"
    recipe.write_text("recipe: pretrain\n")
    script.write_text(RECORDER)
    log.mkdir(exist_ok=True)
    launch = [sys.executable]
    if nproc > 1:
        launch += [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "WATCH": str(os.path.realpath(watch or tmp / "none")),
        "READ_LOG": str(log),
    }
    result = subprocess.run(
        [*launch, str(script), "train", str(recipe), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = {int(p.stem[4:]): json.loads(p.read_text()) for p in log.glob("rank*.json")}
    assert len(logs) == nproc
    return {"stdout": result.stdout, **logs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """An uninterrupted 1-process run and a 2-process FSDP2 run, 8 steps, saving at 4 and 8."""
    root = tmp_path_factory.mktemp("sharded")

    def args(name: str, *extra: str) -> list[str]:
        return [*BASE, f"--data.dir={data_dir}", f"--train.out_dir={root / name}", *STEPS, *extra]

    train(load_config(None, args("single")))
    run_stoker(args("fsdp2", "--dist.strategy=fsdp2"), root / "launch", 2)
    return {"single": root / "single", "fsdp2": root / "fsdp2", "args": args, "root": root}


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def assert_losses(resumed: Path, reference: Path, rel: float) -> None:
    """Steps 5..8 of a run resumed from step 4 against an uninterrupted run (`rel` 0: exact)."""
    got, want = losses(resumed), losses(reference)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == (want[step] if rel == 0 else pytest.approx(want[step], rel=rel)), step


def test_fsdp2_checkpoint_has_a_shard_file_per_rank_and_no_full_files(runs):
    c = ckpt(runs["fsdp2"], 4)
    files = {p.relative_to(c).as_posix() for p in c.rglob("*") if p.is_file()}
    assert {
        "dcp/.metadata",
        "dcp/__0_0.distcp",
        "dcp/__1_0.distcp",
        "sharded.json",
        "trainer_state.json",
        "stoker.json",
    } <= files
    assert "optimizer.pt" not in files and "model.safetensors" not in files
    manifest = json.loads((c / "stoker.json").read_text())["files"]
    assert set(manifest) == files - {"stoker.json"}  # every shard is hashed


def shard_chunks(c: Path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """fqn -> (number of chunks the tensor was saved as (> 1: sharded across ranks), shape)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(c / "dcp").read_metadata()
    return {
        k: (len(v.chunks), tuple(v.size))
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def test_sharded_checkpoint_resumes_on_two_processes_each_reading_its_own_shards(runs):
    c = ckpt(runs["fsdp2"], 4)
    out = runs["root"] / "resumed2"
    logs = run_stoker(
        runs["args"]("resumed2", "--dist.strategy=fsdp2", f"--train.resume={c}"),
        runs["root"] / "launch-r2",
        2,
        watch=c,
    )
    assert "resuming from step 4" in logs["stdout"]
    assert_losses(out, runs["fsdp2"], rel=0)  # same shards, same math: bit-identical
    chunks = shard_chunks(c)
    for rank in (0, 1):
        own = f"__{rank}_0.distcp"
        reads = logs[rank]["read"]
        assert reads, rank
        sharded = [r for r in reads if chunks[r[0]][0] > 1]
        # every chunk of a sharded tensor that this rank read is its own (same world size),
        # one of each sharded tensor
        assert sharded and {r[1] for r in sharded} == {own}, rank
        assert sorted(r[0] for r in sharded) == sorted(k for k, v in chunks.items() if v[0] > 1)
        # from the other rank's file only scalars DCP stores once for all ranks (Adam's step
        # counters), each a few hundred bytes of torch.save framing around 4 bytes
        foreign = [r for r in reads if r[1] != own]
        assert all(
            chunks[r[0]] == (1, ()) and r[0].endswith(".step") and r[3] < 4096 for r in foreign
        ), foreign
        opened = set(logs[rank]["opened"])
        assert not opened & {"model.safetensors", "optimizer.pt"}
        if rank == 1:  # rank 0 also hashed every file (verification); rank 1 opened only:
            theirs = {"dcp/__0_0.distcp"} if foreign else set()
            assert opened <= {
                "stoker.json",
                "trainer_state.json",
                "sharded.json",
                "dcp/.metadata",
                f"dcp/{own}",
                *theirs,
            }, opened


def test_sharded_checkpoint_resumes_on_one_process(runs):
    c = ckpt(runs["fsdp2"], 4)
    logs = run_stoker(
        runs["args"]("resumed1", "--dist.strategy=fsdp2", f"--train.resume={c}"),
        runs["root"] / "launch-r1",
        1,
        watch=c,
    )
    assert "resuming from step 4" in logs["stdout"]
    assert_losses(runs["root"] / "resumed1", runs["fsdp2"], rel=1e-4)
    assert {r[1] for r in logs[0]["read"]} == {"__0_0.distcp", "__1_0.distcp"}  # resharded


@pytest.mark.parametrize("strategy", ["ddp", "zero1"])
def test_full_checkpoint_resumes_with_files_read_on_rank_zero_only(strategy, runs):
    c = ckpt(runs["single"], 4)  # written by one process: model.safetensors + optimizer.pt
    logs = run_stoker(
        runs["args"](f"from-full-{strategy}", f"--dist.strategy={strategy}", f"--train.resume={c}"),
        runs["root"] / f"launch-{strategy}",
        2,
        watch=c,
    )
    assert_losses(runs["root"] / f"from-full-{strategy}", runs["single"], rel=1e-4)
    assert {"model.safetensors", "optimizer.pt"} <= set(logs[0]["opened"])
    assert set(logs[1]["opened"]) <= {"stoker.json", "trainer_state.json"}, logs[1]["opened"]


def test_sharded_checkpoint_resumes_under_zero1_read_on_rank_zero_only(runs):
    c = ckpt(runs["fsdp2"], 4)
    logs = run_stoker(
        runs["args"]("sharded-zero1", "--dist.strategy=zero1", f"--train.resume={c}"),
        runs["root"] / "launch-sz",
        2,
        watch=c,
    )
    assert_losses(runs["root"] / "sharded-zero1", runs["fsdp2"], rel=1e-4)
    assert {r[1] for r in logs[0]["read"]} == {"__0_0.distcp", "__1_0.distcp"}
    assert not logs[1]["read"]
    assert set(logs[1]["opened"]) <= {"stoker.json", "trainer_state.json"}, logs[1]["opened"]


def keyed_by_name(c: Path, to: Path) -> Path:
    """A copy of checkpoint `c` whose optimizer.pt is keyed by parameter name, as FSDP2 runs
    before sharded checkpoints wrote it (get_optimizer_state_dict, full), manifest updated."""
    import shutil

    from stoker.train.checkpoint import build_manifest
    from stoker.train.dist_checkpoint import _param_names
    from stoker.train.optim import build_optimizer

    shutil.copytree(c, to)
    cfg = load_config(None, [*BASE, *STEPS])
    model = build_model(cfg.model, "meta")
    names = _param_names(model, build_optimizer(model, cfg.optim, "cpu"))
    sd = torch.load(to / "optimizer.pt", weights_only=True)
    sd = {
        "state": {names[i]: v for i, v in sd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]
        ],
    }
    torch.save(sd, to / "optimizer.pt")
    meta = json.loads((to / "stoker.json").read_text())
    (to / "stoker.json").write_text(json.dumps({**meta, "files": build_manifest(to)}))
    return to


@pytest.mark.parametrize("keys, strategy", [("index", "fsdp2"), ("name", "fsdp2"), ("name", "ddp")])
def test_full_checkpoint_resumes_under_any_strategy(keys, strategy, runs, tmp_path):
    c = ckpt(runs["single"], 4)
    if keys == "name":  # an earlier FSDP2 run's checkpoint
        c = keyed_by_name(c, tmp_path / "step-00000004")
    name = f"full-{keys}-{strategy}"
    logs = run_stoker(
        runs["args"](name, f"--dist.strategy={strategy}", f"--train.resume={c}"),
        runs["root"] / f"launch-{name}",
        2,
        watch=c,
    )
    assert_losses(runs["root"] / name, runs["single"], rel=1e-4)
    assert set(logs[1]["opened"]) <= {"stoker.json", "trainer_state.json"}, logs[1]["opened"]


# ------------------------------------------------------------------ consolidation on read
def test_export_hf_of_a_sharded_checkpoint_matches_an_unsharded_run(runs, tmp_path):
    from safetensors.torch import load_file

    for name in ("fsdp2", "single"):
        assert main(["export-hf", str(ckpt(runs[name], 8)), str(tmp_path / name)]) == 0
    sharded, single = (load_file(tmp_path / n / "model.safetensors") for n in ("fsdp2", "single"))
    assert sharded.keys() == single.keys()
    for k in single:  # 2 vs 1 process: float reduction order may differ (here it does not)
        torch.testing.assert_close(sharded[k], single[k], rtol=0, atol=1e-6, msg=k)


def test_consolidated_weights_equal_torch_dcp_to_torch_save_bitwise(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    c = ckpt(runs["fsdp2"], 8)
    dcp_to_torch_save(c / "dcp", tmp_path / "ref.pt")  # torch's own consolidation
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)["model"]
    ours = load_model_state_dict(c)
    assert ours.keys() == ref.keys() | {"lm_head.weight"}  # the tied head is stored once
    assert ours["lm_head.weight"] is ours["embed_tokens.weight"]
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    model = load_model(c)  # meta-built, filled from the shards: the same tensors
    assert model.lm_head.weight is model.embed_tokens.weight
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_untied_model_resumes_and_consolidates_from_a_sharded_checkpoint(
    runs, tmp_path, monkeypatch
):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import stoker.models.gpt

    inits = []  # the resumed model is built on meta: never randomly initialized
    plain_init = stoker.models.gpt.init_weights
    monkeypatch.setattr(
        stoker.models.gpt, "init_weights", lambda *a, **k: inits.append(1) or plain_init(*a, **k)
    )

    untied = ["--model.tie_embeddings=false", "--train.max_steps=4", "--train.save_interval=2"]
    run_stoker(runs["args"]("untied", "--dist.strategy=fsdp2", *untied), tmp_path / "a", 2)
    first = runs["root"] / "untied"
    c = ckpt(first, 2)
    train(load_config(None, runs["args"]("untied-1", *untied, f"--train.resume={c}")))
    got, want = losses(runs["root"] / "untied-1"), losses(first)
    assert sorted(got) == [3, 4] and not inits
    assert all(got[s] == pytest.approx(want[s], rel=1e-4) for s in got)
    dcp_to_torch_save(ckpt(first, 4) / "dcp", tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)["model"]
    model = load_model(ckpt(first, 4))
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert model.state_dict().keys() == ref.keys()
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_load_model_builds_on_meta_without_random_init_and_keeps_tied_weights(runs):
    c = ckpt(runs["single"], 8)
    before = torch.get_rng_state()
    model = load_model(c)
    assert torch.equal(torch.get_rng_state(), before)  # random init would draw from the RNG
    cfg = load_config(None, [*BASE, "--model.tie_embeddings=true"]).model
    tied = materialize(build_model(cfg, "meta"), "cpu")
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"


def test_malicious_dcp_metadata_is_refused_not_unpickled(runs, tmp_path):
    import shutil

    c = tmp_path / "copy"
    shutil.copytree(ckpt(runs["fsdp2"], 4), c)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (c / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(StokerError, match="not readable DCP metadata"):
        load_model_state_dict(c)
    assert not marker.exists()
