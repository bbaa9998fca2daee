"""Sharded checkpoints (FSDP2): every rank writes and reads only its own shards.

A checkpoint saved with `dist.strategy=fsdp2` by more than one process holds, instead of
`model.safetensors` + `optimizer.pt` (the full layout, written by rank 0):

    dcp/.metadata            torch.distributed.checkpoint (DCP) index: every tensor's global
                             shape and which byte range of which file holds each chunk
    dcp/__R_0.distcp         rank R's shards of the model and optimizer tensors
    sharded.json             {"aliases": {"lm_head.weight": "embed_tokens.weight"} (tied
                             weights, stored once), "param_groups": the optimizer's groups
                             (hyperparameters and parameter names)}

The layout is told by the presence of `dcp/.metadata` (`is_sharded`). DCP reshards on load,
so a sharded checkpoint resumes on any number of processes, one included (fsdp2 in one process
is a plain model; DCP then loads without a process group), and `load_model_state_dict` /
`load_sharded_weights` consolidate the weights in one process for export-hf, eval, generate and
`stoker.load_model` — reading the model's chunks only, never the optimizer's.

Trust: DCP's `.metadata` is a pickle; it is read with an unpickler that admits only DCP's own
metadata classes, `torch.Size`, dtypes and layouts. DCP loads tensors with
`torch.load(weights_only=True)`; non-tensor values would be loaded with `weights_only=False`, so
none are saved through DCP (the param groups are in sharded.json).

`materialize` turns a model built on the meta device into uninitialized memory on a device,
keeping tied parameters tied (`nn.Module.to_empty` alone unties them): a resumed or loaded model
skips random initialization.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stoker.errors import StokerError

SHARDED_DIR = "dcp"
SIDECAR = "sharded.json"


def is_sharded(ckpt: str | Path) -> bool:
    return (Path(ckpt) / SHARDED_DIR / ".metadata").is_file()


def materialize(model: nn.Module, device: str | torch.device) -> nn.Module:
    """`model.to_empty(device=device)` with shared parameters (tied embeddings) still shared."""
    first: dict[int, str] = {}
    shared: list[tuple[str, str]] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            shared.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    model.to_empty(device=device)
    for name, source in shared:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    return model


def alias_names(model: nn.Module) -> dict[str, str]:
    """{name: earlier name} of parameters registered twice (a tied LM head): stored once."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        first.setdefault(id(p), name)
    return aliases


# ------------------------------------------------------------------------ reading safely
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP checkpoint metadata")


def _reader(directory: Path):
    """DCP's FileSystemReader with `.metadata` read by the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            path = directory / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (
                OSError,
                EOFError,
                ValueError,
                AttributeError,
                TypeError,
                pickle.UnpicklingError,
            ) as e:
                raise StokerError(
                    f"{path} is not readable DCP metadata ({e}); use another checkpoint"
                ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


def _failure(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException."""
    failures = getattr(e, "failures", None) or {}
    for exc, _ in failures.values():
        return exc
    return e


def _dcp_call(fn, *args: Any, **kwargs: Any) -> None:
    """Run dcp.save/dcp.load. DCP gathers a failure on any rank into a CheckpointException
    (a BaseException) on every rank; it is raised here as the failing rank's own exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        fn(*args, **kwargs)
    except CheckpointException as e:
        raise _failure(e) from None


# ---------------------------------------------------------------------- collective I/O
def _group(info):
    return info.control if info.enabled else None


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(model state dict, optimizer state dict, what goes through DCP: every tensor the rank
    holds, its own shards under FSDP2, each tied weight once)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from stoker.train.checkpoint import saved_part

    model_sd, optim_sd = get_state_dict(model, optimizer)
    model_sd = saved_part(model, model_sd)  # a frozen base is not saved
    aliases = alias_names(model)
    state = {
        "model": {k: v for k, v in model_sd.items() if k not in aliases},
        "optim": optim_sd["state"],
    }
    return model_sd, optim_sd, state


def save_sharded(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info) -> None:
    """Collective: every rank writes its shards of the model and optimizer into `tmp/dcp/`
    (no gather: host memory per rank is about one shard item at a time); rank 0 writes
    sharded.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    _, optim_sd, state = _dcp_state(model, optimizer)
    (tmp / SHARDED_DIR).mkdir(parents=True, exist_ok=True)
    _dcp_call(
        dcp.save,
        state,
        storage_writer=FileSystemWriter(tmp / SHARDED_DIR),
        process_group=_group(info),
    )
    if info.is_main:
        sidecar = {"aliases": alias_names(model), "param_groups": optim_sd["param_groups"]}
        (tmp / SIDECAR).write_text(json.dumps(sidecar))


def read_sidecar(ckpt: Path, current_groups: list[dict] | None = None) -> dict[str, Any]:
    """sharded.json; with `current_groups` (the optimizer's), its param groups are checked
    against them and get their tuples back (JSON has lists)."""
    path = Path(ckpt) / SIDECAR
    try:
        sidecar = json.loads(path.read_text())
        groups, aliases = sidecar["param_groups"], sidecar["aliases"]
        if not isinstance(groups, list) or not isinstance(aliases, dict):
            raise ValueError("param_groups is not a list or aliases not a dict")
        if current_groups is not None and len(groups) != len(current_groups):
            raise ValueError(f"{len(groups)} groups, the optimizer has {len(current_groups)}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise StokerError(
            f"{path} is unreadable ({e}); resume from an earlier checkpoint "
            "with --train.resume=PATH"
        ) from None
    for saved, now in zip(groups, current_groups or [], strict=False):
        for k, v in saved.items():
            if isinstance(now.get(k), tuple) and isinstance(v, list):
                saved[k] = tuple(v)
    return sidecar


def load_sharded(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info) -> None:
    """Collective inverse of `save_sharded`, on any number of processes: each rank reads the
    chunks that overlap its own shards (all of them in one process) straight into its model
    and optimizer tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd, state = _dcp_state(model, optimizer)  # the tensors this rank holds
    groups = read_sidecar(ckpt, optim_sd["param_groups"])["param_groups"]
    with _quiet_single_process():
        _dcp_call(
            dcp.load,
            state,
            storage_reader=_reader(ckpt / SHARDED_DIR),
            process_group=_group(info),
            no_dist=not info.enabled,
        )
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from stoker.train.checkpoint import saved_names

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict={"state": state["optim"], "param_groups": groups},
        options=StateDictOptions(strict=saved_names(model) is None),
    )


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when it loads without a process group: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --------------------------------------------------------------- one process, no group
def read_sharded(
    ckpt: Path, prefix: str, into: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The full (consolidated) tensors of a sharded checkpoint whose names start with
    `prefix.` ("model" or "optim"), prefix removed, read in this process without any process
    group. `into`: tensors to load into in place (names without the prefix); they must be
    exactly the saved ones. Otherwise fresh CPU tensors are made from the metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(ckpt) / SHARDED_DIR
    meta = _reader(directory).read_metadata()
    head = prefix + "."
    saved = {
        k[len(head) :]: v
        for k, v in meta.state_dict_metadata.items()
        if k.startswith(head) and isinstance(v, TensorStorageMetadata)
    }
    if into is None:
        into = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in saved.items()}
    else:
        missing, extra = sorted(set(into) - set(saved)), sorted(set(saved) - set(into))
        if missing or extra:
            raise StokerError(
                f"weights in {directory} do not fit the model built from its "
                f"config (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        wrong = [k for k, t in into.items() if tuple(t.shape) != tuple(saved[k].size)]
        if wrong:
            raise StokerError(
                f"weights in {directory} do not fit the model built from its "
                f"config: {wrong[0]} is {tuple(saved[wrong[0]].size)} there, "
                f"{tuple(into[wrong[0]].shape)} in the model"
            )
    state = {head + k: t for k, t in into.items()}
    with _quiet_single_process():
        _dcp_call(dcp.load, state, storage_reader=_reader(directory), no_dist=True)
    return into


def load_sharded_weights(model: nn.Module, ckpt: str | Path) -> None:
    """Copy a sharded checkpoint's consolidated weights into `model` (one process)."""
    from stoker.train.checkpoint import saved_part

    aliases = alias_names(model)
    with torch.no_grad():
        kept = saved_part(model, model.state_dict())
        targets = {k: v for k, v in kept.items() if k not in aliases}
        read_sharded(Path(ckpt), "model", into=targets)


def load_model_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's full model state dict on the CPU, whatever its layout (a sharded one is
    consolidated in this process from the model's chunks; the optimizer is not read)."""
    from stoker.train.checkpoint import load_state_dict_file

    ckpt = Path(ckpt)
    if not is_sharded(ckpt):
        return load_state_dict_file(ckpt / "model.safetensors")
    sd = read_sharded(ckpt, "model")
    for name, source in read_sidecar(ckpt)["aliases"].items():
        sd[name] = sd[source]  # one tensor under both names, as load_state_dict_file gives
    return sd
