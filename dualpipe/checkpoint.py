"""Checkpoints keyed by stage, in ``torch.distributed.checkpoint`` (DCP) format.

A checkpoint holds the model as stages, not ranks: stage ``s``'s ``state_dict`` entry
``name`` is saved under ``model.stage{s}.{name}``, and the optimizer state of its
parameter ``name`` under ``optim.stage{s}.{name}.{key}`` (with the hyper-parameters of
the parameter's group), so a model trained under one layout can be loaded under
another: DualPipe on 4 ranks, DualPipeV on 2 ranks (the same 4 stages), or the
single-process model (:func:`load_stages`).  DualPipe holds every stage on two ranks; it
is saved once (by the rank holding its primary copy) and loaded into both copies.

::

    dualpipe.checkpoint.save(pipe, "ckpt/step100", optimizer)       # every pipeline rank
    dualpipe.checkpoint.load(pipe, "ckpt/step100", optimizer)       # any pipeline layout
    dualpipe.checkpoint.load_stages("ckpt/step100", stages, opt)    # one process

``save``/``load`` are collective over the pipeline: every rank calls them, with the same
path, which all ranks can read and write (a shared file system across hosts).  Argument
errors (another stage count, a stage whose parameters differ from the checkpoint's, an
optimizer whose parameters have no saved state) raise ``ValueError`` on every rank
before any file is touched, never a hang.  Reloading under the same layout continues
bit-identically (weights and optimizer state are exact copies); under another layout the
weights are still exact, but the next steps' gradients are summed in another order, so
they agree with an uninterrupted run to floating-point rounding, not bit for bit.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from .runtime import PipelineRuntime
from .training import local_stages, num_stages

__all__ = ["save", "load", "save_stages", "load_stages"]

_META = "dualpipe.meta"
_FORMAT = 1


def _is_dtensor(t) -> bool:
    from .training import _dtensor_cls
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _group_for(pipe: PipelineRuntime, stages, process_group, what: str):
    """The group DCP coordinates over: the pipeline's by default; sharded (FSDP2)
    stages need one that spans their shards too."""
    if process_group is not None:
        return process_group
    if any(_is_dtensor(p) for _s, m in stages for p in m.parameters()):
        raise ValueError(f"{what}: these stages are FSDP2-sharded (DTensor parameters): pass "
                         "process_group= a group holding every shard as well as the pipeline "
                         "ranks (e.g. torch.distributed.group.WORLD), and call it on all of "
                         "those ranks")
    return pipe.user_group


def _encode(obj) -> bytes:
    """A non-tensor value as one opaque leaf (DCP would flatten dicts and lists)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _decode(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


_COMPILED = "_orig_mod."


def _key(name: str) -> str:
    """A state-dict / parameter name without ``torch.compile``'s wrapper prefix, so a
    compiled and a plain stage share a checkpoint."""
    return name.replace(_COMPILED, "")


def _state(m: nn.Module) -> dict:
    return {_key(k): v for k, v in m.state_dict(keep_vars=False).items()}


def _params(m: nn.Module):
    return ((_key(n), p) for n, p in m.named_parameters())


def _hparams(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict | None:
    for g in optimizer.param_groups:
        if any(q is p for q in g["params"]):
            return {k: v for k, v in g.items() if k != "params"}
    return None


def _collect(stages: Sequence[tuple[int, nn.Module]], optimizer, total: int) -> dict:
    """The flat state dict of ``stages`` (``(stage index, module)`` pairs) to save."""
    sd: dict = {_META: _encode({"format": _FORMAT, "num_stages": total})}
    for s, m in stages:
        for name, t in _state(m).items():
            sd[f"model.stage{s}.{name}"] = t
        if optimizer is None:
            continue
        for name, p in _params(m):
            hp = _hparams(optimizer, p)
            if hp is None:  # not optimized (e.g. frozen): nothing to save for it
                continue
            sd[f"optim.stage{s}.{name}._group"] = _encode(hp)
            for key, v in optimizer.state.get(p, {}).items():
                sd[f"optim.stage{s}.{name}.{key}"] = v if isinstance(v, torch.Tensor) \
                    else _encode(v)
    return sd


def _read_metadata(path):
    try:
        return dcp.FileSystemReader(os.fspath(path)).read_metadata()
    except FileNotFoundError as e:
        raise ValueError(f"no checkpoint at {os.fspath(path)!r}: {e}") from None


def _plan_load(path, stages: Sequence[tuple[int, nn.Module]], optimizer, total: int):
    """Check the checkpoint against ``stages`` and return (state dict to fill, error)."""
    md = _read_metadata(path).state_dict_metadata
    if _META not in md:
        return None, f"{os.fspath(path)!r} is not a dualpipe checkpoint (no {_META} entry)"
    reader_sd = {_META: None}
    for s, m in stages:
        own = _state(m)
        prefix = f"model.stage{s}."
        saved = {k[len(prefix):]: v for k, v in md.items() if k.startswith(prefix)}
        if not saved:
            return None, f"the checkpoint has no stage {s}"
        if sorted(saved) != sorted(own):
            missing = sorted(set(own) - set(saved))[:5]
            extra = sorted(set(saved) - set(own))[:5]
            return None, (f"stage {s} does not match the checkpoint: missing {missing}, "
                          f"unexpected {extra}; load into the same stage definitions")
        for name, t in own.items():
            meta = saved[name]
            size = tuple(getattr(meta, "size", ()))
            if isinstance(t, torch.Tensor) and size != tuple(t.shape):
                return None, (f"stage {s} {name}: the checkpoint has shape {list(size)}, the "
                              f"module {list(t.shape)}")
            reader_sd[prefix + name] = t
        if optimizer is None:
            continue
        for name, p in _params(m):
            if _hparams(optimizer, p) is None:  # not optimized here: nothing to load
                continue
            oprefix = f"optim.stage{s}.{name}."
            keys = [k for k in md if k.startswith(oprefix)]
            if oprefix + "_group" not in keys:
                return None, (f"the checkpoint has no optimizer state for stage {s} {name!r}: "
                              "it was saved without an optimizer")
            for k in keys:
                meta = md[k]
                if hasattr(meta, "size") and hasattr(meta, "properties"):
                    size = tuple(meta.size)
                    if _is_dtensor(p) and size == tuple(p.shape):
                        # an FSDP2-sharded parameter's state is sharded like it: DCP
                        # fills this rank's shard
                        reader_sd[k] = torch.zeros_like(p.detach(), dtype=meta.properties.dtype)
                    else:
                        reader_sd[k] = torch.empty(size, dtype=meta.properties.dtype)
                else:
                    reader_sd[k] = None
    return reader_sd, None


def _apply_optimizer(sd: dict, stages: Sequence[tuple[int, nn.Module]], optimizer) -> None:
    """Put the loaded per-parameter state and hyper-parameters into ``optimizer``."""
    template = optimizer.state_dict()
    index = {}
    i = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            index.setdefault(id(p), i)
            i += 1
    group_of = {}
    for gi, g in enumerate(template["param_groups"]):
        for idx in g["params"]:
            group_of[idx] = gi
    for s, m in stages:
        for name, p in _params(m):
            if id(p) not in index:
                continue
            oprefix = f"optim.stage{s}.{name}."
            idx = index[id(p)]
            state = {}
            for k, v in sd.items():
                if not k.startswith(oprefix):
                    continue
                key = k[len(oprefix):]
                if key == "_group":
                    template["param_groups"][group_of[idx]].update(_decode(v))
                else:
                    state[key] = v.clone() if isinstance(v, torch.Tensor) else _decode(v)
            if state:
                template["state"][idx] = state
            else:
                template["state"].pop(idx, None)
    optimizer.load_state_dict(template)


def _agree(pipe: PipelineRuntime, error: str | None, what: str) -> None:
    """Every pipeline rank learns whether any rank found an error; all raise together."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=pipe.device)
    # host=True: the flags are read on the host (on NCCL a wait is otherwise only
    # stream-ordered, with no deadline of its own)
    flags = pipe.exchange(what, lambda p2p: p2p.all_gather(flag, pipe.num_ranks, what)
                           .wait(pipe.timeout, pipe.failure_record, host=True))
    bad = [r for r, f in enumerate(flags) if int(f)]
    if error is not None:
        raise ValueError(f"{what}: {error}")
    if bad:
        raise ValueError(f"{what}: pipeline rank(s) {bad} rejected the checkpoint (see the error "
                         "on those ranks); nothing was loaded")


def _pipe_stages(pipe: PipelineRuntime, primary_only: bool):
    return [(st.stage, pipe.module[st.chunk]) for st in local_stages(pipe)
            if st.primary or not primary_only]


def save(pipe: PipelineRuntime, path: str | os.PathLike,
         optimizer: torch.optim.Optimizer | None = None, *,
         process_group: dist.ProcessGroup | None = None) -> None:
    """Save this pipeline's stages (and ``optimizer``'s state for them) to ``path``.

    Collective: every rank of ``process_group`` calls it.  Each stage is written once (by
    the rank holding its primary copy); ``path`` is a directory, created if needed.  Call
    it between steps (after ``optimizer.step()``), when both DualPipe copies are
    identical.

    ``process_group`` (default: the pipeline's group) is what DCP coordinates over.
    With data parallelism, either one replica's pipeline saves (the default), or every
    rank calls it with a group spanning all of them (e.g. ``torch.distributed.group.WORLD``;
    replicated entries are written once); FSDP2-sharded stages need the latter, so that
    every shard is written.
    """
    if not isinstance(pipe, PipelineRuntime):
        raise TypeError(f"save takes the pipeline, got {type(pipe).__name__}")
    stages = _pipe_stages(pipe, primary_only=True)
    group = None
    try:
        group = _group_for(pipe, stages, process_group, "dualpipe.checkpoint.save")
        sd, err = _collect(stages, optimizer, num_stages(pipe)), None
    except Exception as e:  # noqa: BLE001 - agreed on below, as in load
        sd, err = None, f"{type(e).__name__}: {e}"
    _agree(pipe, err, "dualpipe.checkpoint.save")
    dcp.save(sd, checkpoint_id=os.fspath(path), process_group=group)


def load(pipe: PipelineRuntime, path: str | os.PathLike,
         optimizer: torch.optim.Optimizer | None = None, *,
         process_group: dist.ProcessGroup | None = None) -> None:
    """Load the stages this rank holds (both DualPipe copies) from a checkpoint written
    by :func:`save` (any layout) or :func:`save_stages`; with ``optimizer``, also the
    state and hyper-parameters of those stages' parameters.

    Collective over the pipeline.  Raises ``ValueError`` on every rank when the
    checkpoint has another number of stages, or a stage whose entries or shapes differ
    from this rank's module, or no optimizer state where one is asked for.
    ``process_group``: as in :func:`save` (FSDP2-sharded stages need a group spanning
    their shards; every one of its ranks calls ``load``).
    """
    if not isinstance(pipe, PipelineRuntime):
        raise TypeError(f"load takes the pipeline, got {type(pipe).__name__}")
    stages = _pipe_stages(pipe, primary_only=False)
    err = None
    sd = None
    group = None
    try:
        group = _group_for(pipe, stages, process_group, "dualpipe.checkpoint.load")
        sd, err = _plan_load(path, stages, optimizer, num_stages(pipe))
        if err is None:
            meta = _decode(_read_metadata_value(path))
            if meta.get("num_stages") != num_stages(pipe):
                err = (f"the checkpoint has {meta.get('num_stages')} stages, this "
                       f"{pipe.schedule_name} pipeline on {pipe.num_ranks} ranks has "
                       f"{num_stages(pipe)}")
    except Exception as e:  # noqa: BLE001 - any local failure (I/O, a corrupt file) is
        err = f"{type(e).__name__}: {e}"  # agreed on, so no rank waits in dcp.load alone
    _agree(pipe, err, "dualpipe.checkpoint.load")
    dcp.load(sd, checkpoint_id=os.fspath(path), process_group=group)
    if optimizer is not None:
        _apply_optimizer(sd, stages, optimizer)


@contextlib.contextmanager
def _local():
    """DCP warns that it assumes one process when torch.distributed is not initialised:
    here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single "
                                "process")
        yield


def _read_metadata_value(path) -> bytes:
    """The ``dualpipe.meta`` entry, read by this process alone (no collective)."""
    sd = {_META: None}
    with _local():
        dcp.load(sd, checkpoint_id=os.fspath(path), no_dist=True)
    return sd[_META]


def _as_stage_list(stages) -> list[tuple[int, nn.Module]]:
    if isinstance(stages, Mapping):
        items = sorted(stages.items())
    elif isinstance(stages, (Sequence, nn.ModuleList, nn.Sequential)):
        items = list(enumerate(stages))
    else:
        raise TypeError("stages must be a sequence of every stage's module (index = stage) or "
                        f"a mapping {{stage index: module}}, got {type(stages).__name__}")
    for s, m in items:
        if not isinstance(m, nn.Module):
            raise TypeError(f"stage {s} is a {type(m).__name__}, not an nn.Module")
    return items


def save_stages(path: str | os.PathLike, stages, optimizer=None) -> None:
    """Single process: save every stage of a model (``stages[s]`` is stage ``s``, or a
    mapping ``{s: module}`` covering all stages) in the pipeline's checkpoint format."""
    items = _as_stage_list(stages)
    with _local():
        dcp.save(_collect(items, optimizer, len(items)), checkpoint_id=os.fspath(path),
                 no_dist=True)


def load_stages(path: str | os.PathLike, stages, optimizer=None) -> None:
    """Single process: load stages from a pipeline checkpoint; ``stages`` is every
    stage's module by index (the checkpoint's stage count must match) or a mapping
    ``{s: module}`` of the stages wanted.  ``ValueError`` when they do not match."""
    items = _as_stage_list(stages)
    sd, err = _plan_load(path, items, optimizer, len(items))
    if err is not None:
        raise ValueError(f"dualpipe.checkpoint.load_stages: {err}")
    meta = _decode(_read_metadata_value(path))
    if not isinstance(stages, Mapping) and meta.get("num_stages") != len(items):
        raise ValueError(f"dualpipe.checkpoint.load_stages: the checkpoint has "
                         f"{meta.get('num_stages')} stages, {len(items)} were given")
    with _local():
        dcp.load(sd, checkpoint_id=os.fspath(path), no_dist=True)
    if optimizer is not None:
        _apply_optimizer(sd, items, optimizer)
