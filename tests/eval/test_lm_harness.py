"""The lm-evaluation-harness model `stoker` (eval/lm_harness.py) against lm-eval's own HF
adapter (`HFLM`) on the same weights exported with `stoker export-hf`: per-request
loglikelihoods, greedy flags, rolling loglikelihoods and greedy generations agree; a MoR run
scores as its own causal full forward; `stoker eval --lm-eval` prints the task's accuracy;
bad inputs are one-line errors.

Models are tiny and random (no training): parity does not need a good model. Two flavours:
GPT-2 with a tokenizer that adds nothing, LLaMA with one whose post-processor adds a BOS.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from tests.conftest import stdlib_text

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from stoker.cli import main  # noqa: E402
from stoker.config import ModelConfig, MoRConfig, MoRRecipeConfig, RecipeConfig  # noqa: E402
from stoker.data.tokenizer import Tokenizer  # noqa: E402
from stoker.eval.lm_harness import StokerLM  # noqa: E402
from stoker.eval.tasks import build_tasks  # noqa: E402
from stoker.hf_dirs import export_hf  # noqa: E402
from stoker.models.gpt import build_model  # noqa: E402
from stoker.models.mor import build_mor  # noqa: E402
from stoker.train.checkpoint import save_model_checkpoint  # noqa: E402

MAX_SEQ = 128
TEXT = stdlib_text(3)
CONTEXTS = ["def f(x):", "import os ", "class A(object):\n    ", TEXT[0][:900], "x = 1\n"]
CONTINUATIONS = [" return x", "path", "def __init__(self):", TEXT[0][900:980], "y = 2"]
PAIRS = list(zip(CONTEXTS, CONTINUATIONS, strict=True))


@pytest.fixture(scope="module", autouse=True)
def _offline_datasets(tmp_path_factory):
    """lm-eval loads the JSONL tasks with `datasets`: its cache in a temp dir, no hub."""
    keys = ("HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(
        dict(zip(keys, (str(tmp_path_factory.mktemp("hfds")), "1", "1"), strict=True))
    )
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory, tokenizer_dir):
    """The shared BPE with a `<s>` BOS that its post-processor prepends, EOS `<|endoftext|>`."""
    from tokenizers import AddedToken, processors

    tok = Tokenizer.load(tokenizer_dir).tok
    tok.add_special_tokens([AddedToken("<s>", special=True)])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    d = tmp_path_factory.mktemp("bos_tok")
    Tokenizer(tok, eos_token="<|endoftext|>", bos_token="<s>").save(d)
    return d


def export_tiny(d, flavour: str, tok_dir):
    """(a random tiny stoker checkpoint, the same weights exported as a transformers dir)."""
    vocab = Tokenizer.load(tok_dir).vocab_size
    preset = "tiny-gpt2" if flavour == "gpt2" else "tiny-llama"
    cfg = ModelConfig(preset=preset, vocab_size=vocab, max_seq_len=MAX_SEQ)
    torch.manual_seed(0)
    config = RecipeConfig(model=cfg).model_dump(mode="json")
    ckpt = save_model_checkpoint(d / "ckpt", build_model(cfg), config, tokenizer_dir=tok_dir)
    return ckpt, export_hf(ckpt, d / "hf")


@pytest.fixture(scope="module", params=["gpt2", "llama-bos"])
def exported(request, tmp_path_factory, tokenizer_dir, bos_tokenizer_dir):
    tok_dir = tokenizer_dir if request.param == "gpt2" else bos_tokenizer_dir
    return export_tiny(tmp_path_factory.mktemp(request.param), request.param, tok_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, bos_tokenizer_dir):
    """One LLaMA checkpoint for the command-line tests."""
    return export_tiny(tmp_path_factory.mktemp("cli"), "llama-bos", bos_tokenizer_dir)[0]


@pytest.fixture(scope="module")
def both(exported):
    """(our adapter, lm-eval's HFLM) on one model; ours batches 3, HFLM 1."""
    from lm_eval.models.huggingface import HFLM

    ckpt, hf_dir = exported
    ours = StokerLM(path=str(ckpt), device="cpu", batch_size=3)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=1, dtype="float32")
    return ours, theirs


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_and_greedy_flags_match_hflm(both):
    ours, theirs = both
    greedy = theirs.generate_until(
        requests("generate_until", [(c, {"until": [], "max_gen_toks": 3}) for c in CONTEXTS[:2]])
    )
    pairs = [*PAIRS, ("", "def f(x):"), *zip(CONTEXTS[:2], greedy, strict=True)]
    got = ours.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    want = theirs.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    torch.testing.assert_close(
        torch.tensor([g[0] for g in got], dtype=torch.float64),
        torch.tensor([w[0] for w in want], dtype=torch.float64),
        atol=1e-4,
        rtol=0,
    )
    assert [g[1] for g in got] == [w[1] for w in want]
    assert any(g[1] for g in got)  # a greedy continuation was scored: the flag can differ


def test_loglikelihood_rolling_matches_hflm_over_several_windows(both):
    ours, theirs = both
    docs = [(TEXT[1][:60],), (TEXT[1][:1500],), (TEXT[2][:2500],)]
    assert len(ours.tok_encode(docs[2][0])) > 3 * MAX_SEQ  # several windows
    got = ours.loglikelihood_rolling(requests("loglikelihood_rolling", docs), disable_tqdm=True)
    want = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", docs), True)
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        atol=1e-4,
        rtol=0,
    )


def test_generate_until_matches_hflm_greedy_and_stops_at_until(both):
    ours, theirs = both
    prompts = ["def f(x):", "import ", "def g(y):\n    return"]
    free = theirs.generate_until(
        requests("generate_until", [(p, {"until": [], "max_gen_toks": 8}) for p in prompts])
    )
    stop = free[0][3:5]  # a stop string inside the first free generation
    args = [(p, {"until": [stop], "max_gen_toks": 8}) for p in prompts]
    args.append((prompts[1], {"until": ["\n\n"], "max_gen_toks": 5}))
    got = ours.generate_until(requests("generate_until", args), disable_tqdm=True)
    want = theirs.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert got == want
    assert got[0] == free[0][: free[0].index(stop)]


@pytest.fixture(scope="module")
def mor_ckpt(tmp_path_factory, tokenizer_dir):
    cfg = ModelConfig(preset="tiny-llama", n_layer=4, vocab_size=384, max_seq_len=MAX_SEQ)
    mor = MoRConfig(recursions=2, sharing="middle_cycle", router="expert")
    torch.manual_seed(0)
    model = build_mor(cfg, mor)
    with torch.no_grad():  # routers that keep some tokens and drop others
        for r in model.routers:
            r.weight.normal_(0, 1.0)
    config = MoRRecipeConfig(model=cfg, mor=mor).model_dump(mode="json")
    d = tmp_path_factory.mktemp("mor") / "ckpt"
    return save_model_checkpoint(d, model, config, tokenizer_dir=tokenizer_dir)


def test_mor_loglikelihood_is_its_causal_full_forward(mor_ckpt):
    lm = StokerLM(path=str(mor_ckpt), device="cpu", batch_size=3)
    pairs = PAIRS
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    model = lm.model
    assert model.threshold_routing
    want = []
    for ctx, cont in pairs:  # one unpadded row at a time
        c, w = lm.tok_encode(ctx.rstrip()), lm.tok_encode(ctx + cont)
        ids = w[-(MAX_SEQ + 1) :]
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)  # (T, V)
        n = len(w) - len(c)
        target = torch.tensor(ids[-n:])
        want.append(float(logp[-n:].gather(-1, target[:, None]).sum()))
    depth = model.last_depth
    assert 1 < depth.float().mean() < 2  # routing kept some tokens and skipped others
    scores = torch.tensor([g[0] for g in got], dtype=torch.float64)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return build_tasks(tmp_path_factory.mktemp("tasks"), n_choice=12, n_docs=1, seed=0)


def test_task_files_are_deterministic_and_well_formed(task_dir, tmp_path):
    again = build_tasks(tmp_path, n_choice=12, n_docs=1, seed=0)
    for name in ("stoker_next_line.jsonl", "stoker_stdlib_ppl.jsonl"):
        assert (task_dir / name).read_bytes() == (again / name).read_bytes()
    rows = [json.loads(line) for line in (task_dir / "stoker_next_line.jsonl").open()]
    assert len(rows) == 12 and {len(r["choices"]) for r in rows} == {4}
    assert all(len(set(r["choices"])) == 4 and r["context"].endswith("\n") for r in rows)
    assert len({r["label"] for r in rows}) > 1  # the answer is not always in one place


def test_stoker_eval_lm_eval_prints_accuracy(ckpt, task_dir, capsys):
    args = ["eval", str(ckpt), "--lm-eval", "stoker_next_line,stoker_stdlib_ppl", "--device"]
    args += ["cpu", "--lm-eval-include", str(task_dir), "--limit", "4", "--batch-size", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stoker_next_line" in out and "bits_per_byte" in out
    row = next(line for line in out.splitlines() if "|acc " in line)
    assert 0 <= float(row.split("|")[7]) <= 1
    args[3] = "stoker_next_line"
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]["stoker_next_line"]
    assert 0 <= result["acc,none"] <= 1 and result["sample_len"] == 4


def test_the_model_is_registered_for_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("stoker") is StokerLM


@pytest.mark.slow
def test_lm_eval_cli_runs_the_stoker_model(ckpt, task_dir, monkeypatch, capsys):
    from stoker.eval.lm_harness import main as lm_eval_main

    argv = ["stoker-lm-eval", "--model", "stoker", "--model_args", f"path={ckpt}"]
    argv += ["--tasks", "stoker_next_line", "--include_path", str(task_dir), "--limit", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    lm_eval_main()
    assert "stoker_next_line" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lm-eval", "stoker_next_line", "--limit", "0"], "--limit must be at least 1"),
        (["--lm-eval", " , "], "--lm-eval needs task names"),
        (["--lm-eval", "stoker_next_line", "--data-dir", "x"], "--data-dir sets the shard"),
        (["--lm-eval", "x", "--lm-eval-include", "/nonexistent"], "is not a directory"),
        (["--lm-eval", "stoker_next_line", "--device", "cpu", "MISSING"], "no such run"),
    ],
)
def test_bad_lm_eval_arguments_are_one_line_errors(ckpt, extra, message, capsys):
    path = "/nonexistent/run" if "MISSING" in extra else str(ckpt)
    extra = [e for e in extra if e != "MISSING"]
    assert main(["eval", path, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stoker: error:") and message in err and "\n" not in err


def test_missing_lm_eval_is_a_one_line_error_with_the_fix(ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", str(ckpt), "--lm-eval", "stoker_next_line"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'stoker[lmeval]'" in err and "\n" not in err


@pytest.mark.slow
def test_unknown_task_is_a_one_line_error_naming_the_nearest(ckpt, capsys):
    assert main(["eval", str(ckpt), "--lm-eval", "stoker_nextline"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown lm-eval task stoker_nextline" in err and "stoker_next_line" in err
    assert "\n" not in err
