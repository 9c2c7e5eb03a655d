"""Before a step runs: the constructor's check of the stage modules, ``step()``'s
argument checks, and the step-start handshake.

Arguments are checked locally first (:meth:`ArgChecks._check_args`); then one
``all_gather`` of a few integers (:meth:`ArgChecks._handshake`) compares schedule,
``num_chunks``, mode, input signature, batch sizes and argument errors across ranks, so
a mismatch or a bad argument on one rank raises ``ValueError`` on every rank instead of
hanging.  Every rank sees every rank's figures, so every rank finds the same answer.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import torch
import torch.nn as nn

from overlap.p2p import PeerError, PeerTimeout

from ..schedules import Schedule, spec_of
from ..utils import scatter
from . import boundary
from .boundary import sig

__all__ = ["ArgChecks", "stage_modules"]

HS_LEN = 12
MAX_SIGNATURES = 64  # input signatures whose boundary shapes a pipeline keeps


def stage_modules(modules, want: int, name: str) -> tuple[nn.Module, ...]:
    """This rank's stage modules from what the user passed.

    As in ``deepseek-ai/DualPipe`` (which wraps ``modules`` in ``nn.ModuleList``), the
    stages may come as a tuple, a list, an ``nn.ModuleList`` or an ``nn.Sequential``.  A
    schedule with one stage per rank also takes the stage itself; there an
    ``nn.Sequential`` is that one stage (it is callable), while an ``nn.ModuleList``
    (which is not) is a container."""
    if isinstance(modules, nn.ModuleList) or (isinstance(modules, nn.Sequential) and want > 1):
        stages = tuple(modules)
        what = f"an nn.{type(modules).__name__} of {len(stages)} module(s)"
    elif isinstance(modules, nn.Module):
        stages = (modules,)
        what = f"one {type(modules).__name__}"
    elif isinstance(modules, (tuple, list)):
        stages = tuple(modules)
        what = f"a {type(modules).__name__} of {[type(m).__name__ for m in stages]}"
    else:
        raise ValueError(f"modules must be nn.Module stages (a tuple, list, nn.ModuleList or "
                         f"nn.Sequential of them), got {type(modules).__name__}")
    if len(stages) != want or not all(isinstance(m, nn.Module) for m in stages):
        raise ValueError(f"schedule {name!r} needs {want} nn.Module stage(s) per rank "
                         f"({'stage r and its partner stage' if want == 2 else 'the stage'}), "
                         f"got {what}")
    from torch.nn.parallel import DistributedDataParallel
    if any(isinstance(x, DistributedDataParallel) for m in stages for x in m.modules()):
        raise ValueError("a stage is wrapped in DistributedDataParallel, which reduces "
                         "gradients inside every backward; a pipeline runs one backward per "
                         "micro-batch (split into input- and weight-gradient parts): pass the "
                         "plain stage and call dualpipe.all_reduce_grads(pipe, dp_group) after "
                         "step(), or shard the stage with FSDP2's fully_shard (docs/training.md)")
    return stages


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule is FSDP2-sharded (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps it private
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _has_tensor(x) -> bool:
    """``x`` (a tensor, or a tuple/list that may hold ``None``) holds a tensor."""
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in x)


class ArgChecks:
    """The argument checks and the handshake of
    :class:`~dualpipe.runtime.PipelineRuntime` (a mixin; the attributes it reads are set
    by the constructor)."""

    rank: int
    num_ranks: int
    batch_dim: int
    device: torch.device
    schedule_name: str
    to_group: tuple[int, ...]
    _arg_sizes: tuple[int, int]
    _decl_bound: tuple | None
    _decl_pending: tuple | None
    _label_pairs: dict[int, tuple]
    _sig_keys: dict[tuple, None]

    def _remember_signature(self, key: tuple) -> None:
        """Keep what crossed the boundaries for the last MAX_SIGNATURES input signatures
        (a new sequence length is a new signature).  Every rank sees the same sequence of
        keys (the handshake agrees on them), so every rank forgets the same entries."""
        keys = self._sig_keys
        if key in keys:
            del keys[key]
        keys[key] = None
        if len(keys) > MAX_SIGNATURES:
            old = next(iter(keys))
            del keys[old]
            for d in (self._meta_sent, self._meta_recv, self._meta_checked, self._mask_sent,
                      self._mask_recv):
                for k in [k for k in d if (k[0], k[1], k[3]) == old]:
                    del d[k]

    def _check_args(self, s: Schedule, inputs, criterion, labels, forward_only):
        r = self.rank
        c_in, c_loss = s.input_chunk(r), s.loss_chunk(r)
        batches = {}
        in_size = -1
        if c_in is not None:
            if not inputs or all(x is None for x in inputs):
                raise ValueError(f"pipeline rank {r} holds the first stage of a stream: pass the "
                                 "batch as step(*inputs, ...) on this rank")
            for x in inputs:
                if x is not None and not isinstance(x, torch.Tensor):
                    raise ValueError(f"step() inputs must be tensors, got {type(x).__name__}")
            batches[c_in] = self._split(inputs, len(s.input_microbatches(r)), "inputs")
            self._check_declaration(inputs)
            in_size = self._batch_size(inputs)
        elif inputs and any(x is not None for x in inputs):
            warnings.warn(f"pipeline rank {r} holds no first stage: its step() inputs are "
                          "ignored", stacklevel=3)
        label_mbs = {}
        label_size = -1
        if c_loss is not None:
            if criterion is None and not forward_only:
                raise ValueError(f"pipeline rank {r} holds the last stage of a stream: pass "
                                 "criterion=... to step() on this rank to train")
            if criterion is not None:
                n = len(s.loss_microbatches(r))
                labels = (labels,) if isinstance(labels, torch.Tensor) else tuple(labels)
                label_mbs[c_loss] = self._split(labels, n, "labels") if labels else [()] * n
                label_size = self._batch_size(labels)
        elif _has_tensor(labels):
            # the published examples pass criterion= and labels=(None,) on every rank:
            # only labels that are really there are worth a word
            warnings.warn(f"pipeline rank {r} holds no last stage: its step() labels are "
                          "ignored", stacklevel=3)
        self._arg_sizes = (in_size, label_size)
        return batches, label_mbs

    def _batch_size(self, xs) -> int:
        """The batch size (along batch_dim) of step() inputs or labels, -1 when none of
        them has that dimension; refused when they disagree (each would be split into
        micro-batches of another size)."""
        d = self.batch_dim
        sizes = {x.shape[d] for x in xs if isinstance(x, torch.Tensor) and x.dim() > d}
        if len(sizes) > 1:
            raise ValueError(f"step() tensors of one argument have different batch sizes "
                             f"{sorted(sizes)} along batch_dim={d}: every input (and every "
                             "label) tensor is split into the same micro-batches, so they "
                             "must have the same size there")
        return sizes.pop() if sizes else -1

    def _check_declaration(self, inputs) -> None:
        """Refuse a step whose inputs differ from those that a set_p2p_tensor_shapes/dtype
        declaration was first used with (checked where the inputs are, before the step's
        handshake, so every rank stops at the start instead of one failing mid-step)."""
        self._decl_pending = None
        shapes, dtype, version = boundary._p2p_shapes, boundary._p2p_dtype, boundary._p2p_version
        if shapes is None and dtype is None:
            return
        if shapes is not None:
            s = sig(inputs)
        else:  # a dtype alone says nothing about shapes
            s = ";".join(str(t.dtype) if isinstance(t, torch.Tensor) else "None"
                         for t in inputs)
        bound = self._decl_bound
        if bound is not None and bound[0] == version:
            if bound[1] != s:
                what = (f"shapes {[list(x) for x in shapes]}" if shapes is not None
                        else f"dtype {dtype}")
                raise ValueError(
                    f"set_p2p_tensor_shapes/dtype declared the boundary {what} for step inputs "
                    f"{bound[1]}, but this step's inputs are {s}, which changes what crosses "
                    "the stage boundaries: declare the new shapes (set_p2p_tensor_shapes) "
                    "before this step, or call set_p2p_tensor_shapes(None) and "
                    "set_p2p_tensor_dtype(None) to let the pipeline exchange them itself")
            return
        self._decl_pending = (version, s)  # bound once a step has run with it

    def _split(self, xs, n: int, what: str) -> list[tuple]:
        d = self.batch_dim
        for x in xs:
            if x is None:
                continue
            if x.dim() <= d:
                raise ValueError(f"step() {what}: a tensor of shape {list(x.shape)} has no "
                                 f"batch dimension {d}")
            if x.shape[d] == 0:
                raise ValueError(f"step() {what}: batch size 0 (dim {d}, a tensor of shape "
                                 f"{list(x.shape)}): an empty batch gives empty micro-batches, "
                                 "whose losses are NaN; pass at least one sample per "
                                 f"micro-batch ({n} here), or skip the step on every rank")
            if x.shape[d] % n:
                raise ValueError(f"step() {what}: batch size {x.shape[d]} (dim {d}) is not "
                                 f"divisible into {n} micro-batches; make it a multiple of {n}")
            if x.device != self.device:
                raise ValueError(f"step() {what} are on {x.device} but the stages are on "
                                 f"{self.device}: move them first")
        # each micro-batch is made contiguous (a no-op for slices along dim 0 of a
        # contiguous batch), so strided inputs compute exactly what contiguous ones do
        return [tuple(None if t is None else t.contiguous() for t in mb)
                for mb in scatter(xs, n, d)]

    def _handshake(self, num_chunks, forward_only, return_outputs, err, inputs,
                   s: Schedule | None = None) -> tuple:
        """The step-start handshake (collective): raises the ``ValueError`` every rank
        raises when any rank's arguments were refused or the ranks disagree; returns
        every rank's input signature hash."""
        hs = torch.zeros(HS_LEN, dtype=torch.int64)
        hs[0] = 0x4450
        hs[1] = zlib.crc32(self.schedule_name.encode()) & 0x7FFFFFFF
        hs[2] = num_chunks if isinstance(num_chunks, int) else -1
        hs[3] = int(forward_only)
        hs[4] = int(return_outputs)
        hs[5] = 0 if err is None else 1
        hs[6] = zlib.crc32(sig(inputs).encode()) if inputs else 0
        hs[7] = self.rank
        hs[8], hs[9] = self._arg_sizes if err is None else (-1, -1)
        try:
            # CUDA: on a private stream, so neither the copy nor the collective queues
            # behind the previous step's work on the current stream
            with self._private_stream():
                out = self._p2p.all_gather(hs.to(self.device), self.num_ranks,
                                           "step handshake").wait(
                    self.timeout, self._abort, host=True)
        except PeerError as e:
            if isinstance(e, PeerTimeout):
                e = PeerTimeout(f"the step-start handshake timed out after "
                                f"{self.timeout.total_seconds():g} s: some rank did not call "
                                "step()", -1, "handshake")
            raise self._failed(e, "handshake", e.__traceback__) from e
        rows = [t.tolist() for t in out]
        if err is not None:
            raise err
        bad = [row[7] for row in rows if row[5]]
        if bad:
            raise ValueError(f"pipeline rank(s) {bad} rejected their step() arguments (see the "
                             "error on those ranks); every rank stops this step")
        for idx, what in ((1, "schedule"), (2, "num_chunks"), (3, "grad mode (training vs "
                          "torch.no_grad inference)"), (4, "return_outputs")):
            vals = [row[idx] for row in rows]
            if len(set(vals)) > 1:
                per = ", ".join(f"rank {row[7]}: {v}" for row, v in zip(rows, vals))
                raise ValueError(f"step() called with different {what} across pipeline ranks "
                                 f"({per}); call it identically on every rank")
        if s is not None:
            self._check_label_sizes(s, rows)
        return tuple(row[6] for row in rows)

    def _check_label_sizes(self, s: Schedule, rows: list[Any]) -> None:
        """Labels hold one entry per input sample (split along batch_dim like the
        inputs): compare each rank's labels with the inputs of the stream whose loss it
        computes, which may be on another rank (DualPipe: rank 0's labels belong to the
        last rank's inputs; 1F1B: the last rank's to rank 0's).  Every rank has every
        rank's sizes from the handshake and finds the same answer, so all refuse the
        step together, before anything ran (torch would otherwise broadcast a label
        batch of 1 with only a warning)."""
        pairs = self._label_pairs.get(s.num_chunks)
        if pairs is None:  # (loss rank, its stream's input rank), once per schedule
            pairs = self._label_pairs[s.num_chunks] = tuple(
                (r, s.stage_owner[(s.placement[r][c][0], 0)][0])
                for r in range(self.num_ranks) if (c := s.loss_chunk(r)) is not None)
        d, to_group = self.batch_dim, self.to_group
        for r, q in pairs:
            labels, n = rows[to_group[r]][9], rows[to_group[q]][8]
            if labels < 0:
                continue
            if n >= 0 and n != labels:
                where = f"pipeline rank {q}" + (", the same rank" if q == r else "")
                # a rank that passes inputs of one stream and the labels of another (both
                # ends of DualPipe) is easy to get wrong: say whose labels it passes
                crossed = q != r and s.input_chunk(r) is not None
                title = spec_of(self.schedule_name).title
                raise ValueError(
                    f"step() labels on pipeline rank {r} have batch size {labels} (dim {d}) "
                    f"but the inputs they belong to ({where}) have batch size {n}: pass one "
                    "label per input sample, split along batch_dim like the inputs"
                    + (f" ({title}: each end rank passes the labels of the other end's "
                       "inputs)" if crossed else ""))
