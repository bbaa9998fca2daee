"""Each `stoker validate` check FAILs when its setup is broken on purpose, on a small real task
(a frozen BatchNorm + linear encoder and a trainable head on fixed data) built here."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.config import load_config
from stoker.errors import StokerError
from stoker.tasks.base import Task, check_supervised_rows
from stoker.train.distributed import DistInfo
from stoker.validate import checks as C

V = 8


class Rows:
    """The loop's data interface: batch(step, ...) a pure function of the step."""

    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, V, (n,), generator=g)

    def batch(self, step, rank=0, world=1, micro=0, n_micro=1):
        i = torch.arange(4) + 4 * (step % 4)
        return self.x[i], self.y[i]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16))
        self.head = nn.Linear(16, V)
        self.spare = nn.Parameter(torch.zeros(3))  # used only when `use_spare`
        self.use_spare = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        out = self.head(self.encoder(x))
        return out + self.spare.sum() if self.use_spare else out

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics stay
        return self


class ToyTask(Task):
    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.train_data = Rows()
        self.bugs: set[str] = set()

    def build_model(self, device, ckpt):
        m = Toy()
        if "head_scale" in self.bugs:
            with torch.no_grad():
                m.head.weight.mul_(100)
        if "spare_unused" in self.bugs:
            m.use_spare = False
        return m.to(device)

    def train_mode(self, model):
        model.train()
        if "bn_train" in self.bugs:
            model.encoder.train()

    def param_groups(self, model):
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        if "lost_param" in self.bugs:
            params = [p for p in params if p is not model.spare]
        return [{"params": params, "weight_decay": 0.0}]

    def to_device(self, batch, device):
        return tuple(t.to(device) for t in batch)

    def count(self, batch):
        return len(batch[1])

    def loss(self, model, batch):
        x, y = batch
        if "nan" in self.bugs:
            x = x * float("nan")
        return F.cross_entropy(model(x), y, reduction="sum"), None

    def initial_loss(self):
        return math.log(V)


@pytest.fixture
def probe(tmp_path):
    def make(*bugs: str, **over) -> C.Probe:
        cfg = load_config(None, {"recipe": "pretrain", "optim": {"lr": 1e-2}, **over})
        p = C.Probe(cfg, tmp_path / "work")
        p.task = ToyTask(cfg, DistInfo())
        p.task.bugs = set(bugs)
        p.model = p.fresh_model()
        p.batch = p.draw(0)
        return p

    return make


def test_every_check_passes_on_the_sound_toy(probe):
    p = probe()
    for name in ("init", "data", "freezing", "forward", "step", "checkpoint", "tracking",
                 "short_run"):  # fmt: skip
        assert C.CHECKS[name](p)


def test_freezing_fails_when_a_frozen_batchnorm_runs_in_training_mode(probe):
    with pytest.raises(C.Failed, match="encoder.1 is in training mode"):
        C.check_freezing(probe("bn_train"))


def test_freezing_fails_when_a_trainable_tensor_is_in_no_optimizer_group(probe):
    with pytest.raises(C.Failed, match="spare is in no optimizer group"):
        C.check_freezing(probe("lost_param"))


def test_step_fails_when_a_trainable_tensor_is_off_the_loss_path(probe):
    with pytest.raises(C.Failed, match="no gradient.*spare"):
        C.check_step(probe("spare_unused"))


def test_forward_fails_on_a_non_finite_loss_and_far_from_ln_v(probe):
    with pytest.raises(C.Failed, match="the loss is nan"):
        C.check_forward(probe("nan"))
    with pytest.raises(C.Failed, match="far from ln V"):
        C.check_forward(probe("head_scale"))


def test_checkpoint_fails_when_the_save_drops_or_the_load_ignores_tensors(probe, monkeypatch):
    import stoker.train.checkpoint as ckpt

    save = ckpt.save_model_checkpoint
    monkeypatch.setattr(ckpt, "save_model_checkpoint",
                        lambda d, sd, *a, **k: save(d, {k2: v for k2, v in sd.items()
                                                        if k2 != "head.bias"}, *a, **k))  # fmt: skip
    with pytest.raises(C.Failed, match="lacks trainable head.bias"):
        C.check_checkpoint(probe())
    monkeypatch.setattr(ckpt, "save_model_checkpoint", save)
    monkeypatch.setattr(ckpt, "load_weights", lambda model, path: None)
    with pytest.raises(C.Failed, match="reloaded model gives loss"):
        C.check_checkpoint(probe())


def test_tracking_fails_when_metrics_do_not_read_back(probe, monkeypatch):
    import stoker.train.tracking as tracking

    monkeypatch.setattr(tracking.Tracker, "log", lambda self, row: None)
    with pytest.raises(C.Failed, match="reads back"):
        C.check_tracking(probe())


def test_short_run_fails_when_the_trainable_part_cannot_fit(probe):
    p = probe()
    build = p.task.build_model

    def only_spare(device, ckpt):
        m = build(device, ckpt)
        m.head.requires_grad_(False)  # the spare scalar shift cannot fit 8 classes
        return m

    p.task.build_model = only_spare
    with pytest.raises(C.Failed, match="should at least halve"):
        C.check_short_run(p, max_steps=20)


def test_supervised_rows_reject_masked_padded_and_misaligned_labels():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    pad = ids == 0
    good = torch.tensor([[-100, 6, 7, -100], [-100, 6, -100, -100]])
    assert check_supervised_rows(ids, good, 0, pad) == [2, 1]
    with pytest.raises(StokerError, match="sample 1 .* no supervised token"):
        check_supervised_rows(ids, torch.tensor([[-100, 6, 7, -100], [-100] * 4]), 0, pad)
    with pytest.raises(StokerError, match="labels on padding"):
        check_supervised_rows(ids, torch.tensor([[-100, 6, 7, 0], [-100, 6, -100, -100]]), 0, pad)
    with pytest.raises(StokerError, match="not its own tokens"):
        check_supervised_rows(
            ids, torch.tensor([[-100, 7, 7, -100], [-100, 6, -100, -100]]), 0, pad
        )


def test_only_selects_the_checks_and_what_they_need():
    from stoker.validate import selected

    assert selected(["short_run"]) == ["config", "init", "data", "forward", "step", "short_run"]
    with pytest.raises(StokerError, match="no such check"):
        selected(["nope"])
