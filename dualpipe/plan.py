"""``python -m dualpipe plan``: choose a schedule, pipeline size, data-parallel size and
micro-batch count for a model of ``L`` identical blocks on ``D`` devices.

The input is the cost of **one block** for a micro-batch of ``micro_batch`` samples
(:class:`BlockCosts`): forward ``f``, full backward ``b``, its weight-gradient part ``w``,
optionally an overlapped forward+backward ``fb``, the bytes the forward saves for the
backward, the parameter bytes and the bytes of the block's output (what a stage sends to
the next).  It comes from a JSON file (:meth:`BlockCosts.load`) or is measured on the
block itself (:func:`profile_stage`).

Every candidate -- a registered schedule, a pipeline size ``P`` dividing ``D`` that the
schedule supports, ``DP = D / P`` replicas and a micro-batch count ``N`` dividing the
per-replica batch ``G / DP`` that the schedule's generator accepts -- is priced with the
simulator (:func:`dualpipe.simulate.simulate`) and its memory per device estimated; the
cheapest candidate that fits the memory cap is recommended (:func:`plan`).

What is modelled, and what is not:

* a stage of ``k = L / S`` blocks (``S = Schedule.num_stages``) costs ``k`` times a
  block, plus the runtime's own ``overhead`` per action (:func:`stage_costs`);
* with a stage factory the block is profiled at every micro-batch size the plan prices
  (``plan(costs_at=...)``; the command line's default); from one cost file a
  micro-batch of ``m`` samples costs ``m / micro_batch`` times the given one (time,
  saved activations and boundary bytes scaled **linearly** -- small micro-batches that
  underuse a device are priced too low);
* a transfer between ranks costs ``latency + boundary_bytes * scale / bandwidth``;
  ``latency``, ``bandwidth`` and ``overhead`` are measured on 2 local gloo ranks
  (:func:`measure_runtime`; the command line's default with a stage factory) or given;
* the step time is the simulated makespan of one replica; the gradient synchronisation
  after it is modelled only when asked (:class:`GradSync`, ``--grad-sync-bandwidth``):
  then what :func:`dualpipe.training.sync_grads` runs is added, **not overlapped** with
  the pipeline (an upper bound): a ring all-reduce over the ``DP`` replicas of the
  gradients of every stage module a rank holds (``2 (DP - 1) / DP`` of their bytes over
  the given bandwidth, plus ``2 (DP - 1)`` latencies, and as many again for the small
  all-reduce of which parameters have a gradient) and, for a schedule with duplicated
  stages (DualPipe), the exchange with the partner rank holding the other copies, at the
  pipeline's transfer latency and bandwidth (DP = 1: one swap of both modules; DP > 1:
  one module there and one back around an all-reduce of the primary copies alone, see
  :func:`grad_sync_time`).  The optimizer step is never modelled;
* memory per device is the peak of live activations on the worst rank (the simulator's
  ``peak_activations``, in stage-chunk units, times ``k`` blocks' saved bytes) plus the
  parameters of every stage module the rank holds (``Schedule.stages_per_rank``: DualPipe
  keeps two copies, DualPipeV two different stages) times ``param_factor`` (weights,
  gradients and optimizer state per parameter byte); allocator slack, workspace and
  the received/sent boundary buffers are not counted.

Checking a prediction (``--verify``, :func:`verify`, with ``--stage`` only): the
recommendation and one runner-up (:func:`verify_candidates`) run through the real runtime
on this host -- ``P`` local gloo ranks on CPU per replica (:func:`dualpipe.launch.run_ranks`,
the profile's torch thread count each), the candidate's ``DP`` replicas when ``P x DP``
ranks fit ``--verify-max-ranks`` (else one, said in a note), stage modules of
``k`` fresh blocks from the factory, ``split_linear_weight_grads=True`` (W deferred as
the profile measured it), ``transport="group"``; each micro-batch is the example
micro-batch repeated along dim 0 to the candidate's ``m`` rows.  The measured step time
is the median makespan of ``step()`` (max end - min start across the ranks) of the timed
steps, against the candidate's simulated pipeline makespan.  After each step the ranks
synchronise the gradients as training does (``sync_grads``), timed apart and checked
against
:func:`grad_sync_time` with this host's all-reduce latency and bandwidth, fitted to two
sizes timed over the replicas in the run (the ``--grad-sync-*`` figures describe the
cluster, which this host cannot measure; what is checked is the model).  Every rank also
re-profiles the block at the candidate's micro-batch around its run, and the schedule is
priced again with that profile (``--verify-reprofile``): the prediction without the
machine's drift between the plan and the run; the profiles' spread says whether the
machine held still enough to check a prediction at all.

The communication SM budget (``--comm-sms FILE --comm-bytes BYTES``,
:mod:`dualpipe.comm_budget`): from ``bench.overlap_gpu``'s measurement of a compute and
a communication kernel side by side at each SM split on the target GPU, every candidate
is priced at every measured budget (compute slowed by the split, F and B alone waiting
for their half of the block's communication, F&B overlapping it at the measured
efficiency) and keeps its best; the table says which.  The measurement is the GPU's; the
plan itself needs none.

Not in this version: ``--verify`` on CUDA blocks.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from .comm_budget import CommBudget, budget_label, load_comm_budget
from .schedules import B, F, FB, I, REGISTRY, W, get_schedule, placement_schedule, spec_of
from .simulate import Costs, SimResult, simulate

__all__ = ["BlockCosts", "Candidate", "Plan", "plan", "profile_stage", "load_stage_factory",
           "Verification", "verify", "measured_costs", "breakdown", "verify_candidates", "parse_bytes", "format_bytes",
           "add_arguments", "check_arguments", "run"]

FEASIBLE = "feasible"
OVER_MEMORY = "over memory cap"
INVALID = "invalid"


# --------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class BlockCosts:
    """The cost of one block (layer) for a micro-batch of ``micro_batch`` samples.

    Times in seconds (``f``, ``b``, ``w``, ``fb``, ``latency``, ``overhead``), sizes in
    bytes, ``bandwidth`` in bytes per second (``math.inf``: transfers cost only
    ``latency``).  ``fb`` is an overlapped forward+backward pair, ``None`` for no overlap
    (``f + b``).  ``overhead`` is the runtime's own cost per executed action (scheduling,
    posting and matching transfers), added to every stage action whatever its size:
    once to F, I and W, twice to a full B (it does the work of I and W) and to an F&B
    pair.
    """

    f: float
    b: float
    w: float
    act_bytes: int
    param_bytes: int
    boundary_bytes: int
    micro_batch: int
    fb: float | None = None
    latency: float = 0.0
    bandwidth: float = math.inf
    overhead: float = 0.0

    REQUIRED = ("f", "b", "w", "act_bytes", "param_bytes", "boundary_bytes", "micro_batch")
    OPTIONAL = ("fb", "latency", "bandwidth", "overhead")

    def __post_init__(self):
        for name in ("f", "b", "w", "latency", "overhead", "act_bytes", "param_bytes",
                     "boundary_bytes"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or v < 0:
                raise ValueError(f"cost model field {name!r} must be a finite number >= 0, "
                                 f"got {v!r}")
        for name in ("act_bytes", "param_bytes", "boundary_bytes", "micro_batch"):
            v = getattr(self, name)
            if not _is_number(v) or v != int(v):
                raise ValueError(f"cost model field {name!r} must be a whole number of "
                                 f"{'samples' if name == 'micro_batch' else 'bytes'}, got {v!r}")
        if self.micro_batch < 1:
            raise ValueError(f"cost model field 'micro_batch' must be >= 1 (the samples the "
                             f"costs were measured on), got {self.micro_batch!r}")
        if self.w > self.b:
            raise ValueError(f"cost model field 'w' ({self.w}) cannot exceed 'b' ({self.b}): "
                             "w is the weight-gradient part of the full backward b")
        if self.fb is not None and (not _is_number(self.fb) or not math.isfinite(self.fb)
                                    or self.fb < 0):
            raise ValueError(f"cost model field 'fb' must be a finite number >= 0 or null "
                             f"(no overlap: f + b), got {self.fb!r}")
        if not _is_number(self.bandwidth) or not self.bandwidth > 0:
            raise ValueError(f"cost model field 'bandwidth' must be > 0 bytes/s (null or "
                             f"omitted: infinite), got {self.bandwidth!r}")

    @classmethod
    def from_json(cls, d: Any) -> "BlockCosts":
        """Build from a JSON object; ``ValueError`` naming a missing, unknown or bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"the cost model must be a JSON object with fields "
                             f"{', '.join(cls.REQUIRED)}; got {type(d).__name__}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"cost model is missing field(s) {', '.join(map(repr, missing))} "
                             f"(required: {', '.join(cls.REQUIRED)}; optional: "
                             f"{', '.join(cls.OPTIONAL)})")
        unknown = sorted(set(d) - set(cls.REQUIRED) - set(cls.OPTIONAL))
        if unknown:
            raise ValueError(f"cost model has unknown field(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(cls.REQUIRED + cls.OPTIONAL)})")
        kw = dict(d)
        if kw.get("bandwidth") is None:
            kw["bandwidth"] = math.inf
        for name in ("latency", "overhead"):
            if kw.get(name) is None:
                kw[name] = 0.0
        for name in ("act_bytes", "param_bytes", "boundary_bytes", "micro_batch"):
            v = kw[name]
            if _is_number(v) and v == int(v):
                kw[name] = int(v)
        return cls(**kw)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BlockCosts":
        try:
            with open(path) as fh:
                d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"cost model {os.fspath(path)!r} is not valid JSON: {e}") from None
        except OSError as e:
            raise ValueError(f"cannot read cost model {os.fspath(path)!r}: {e}") from None
        try:
            return cls.from_json(d)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.REQUIRED + self.OPTIONAL}
        if math.isinf(self.bandwidth):
            d["bandwidth"] = None  # JSON has no infinity; null reads back as infinite
        return d

    def with_transport(self, latency: float | None, bandwidth: float | None,
                       overhead: float | None = None) -> "BlockCosts":
        """A copy with ``latency``/``bandwidth``/``overhead`` replaced where given."""
        kw = {k: getattr(self, k) for k in self.REQUIRED + self.OPTIONAL}
        for name, v in (("latency", latency), ("bandwidth", bandwidth), ("overhead", overhead)):
            if v is not None:
                kw[name] = v
        return BlockCosts(**kw)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"8GiB"`` -> 8589934592; plain numbers are bytes.  Decimal (kB, MB, GB, TB) and
    binary (KiB, MiB, GiB, TiB) suffixes, case-insensitive."""
    if _is_number(text):
        n = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m and _UNITS.get(m.group(2).lower())
        if not m or unit is None:
            raise ValueError(f"cannot read {text!r} as a size: write bytes or a number with "
                             "a suffix, e.g. 8GiB, 512MiB, 80GB")
        n = float(m.group(1)) * unit
    if n < 0:
        raise ValueError(f"a size must be >= 0, got {text!r}")
    return int(n)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------- profiling


def load_stage_factory(ref: str) -> Callable[[], tuple]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    mod_name, sep, fn_name = ref.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"--stage takes module:function (e.g. examples.plan_stage:make_block), "
                         f"got {ref!r}")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            spec = importlib.util.spec_from_file_location("_dualpipe_plan_stage", mod_name)
            if spec is None or spec.loader is None:
                raise ImportError(f"no such file {mod_name!r}")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
    except (ImportError, OSError) as e:
        raise ValueError(f"cannot import the stage factory module {mod_name!r}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{mod_name!r} has no function {fn_name!r}")
    return fn


def _call_factory(factory: Callable[[], tuple]) -> tuple:
    """``factory()`` checked: ``(block, example inputs as a tuple, criterion or None)``."""
    import torch
    got = factory()
    if not isinstance(got, tuple) or len(got) != 3:
        raise ValueError("the stage factory must return (block, example_micro_batch, "
                         f"criterion_or_None), got {type(got).__name__}")
    block, example, criterion = got
    if not isinstance(block, torch.nn.Module):
        raise ValueError(f"the stage factory's block must be an nn.Module, got "
                         f"{type(block).__name__}")
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
        raise ValueError("the example micro-batch must be a tensor (or a tuple of tensors) "
                         "whose first dimension is the micro-batch size")
    return block, inputs, criterion


def _loss(out, criterion):
    """The scalar that drives a block's backward: ``criterion(out)`` when the factory
    gave one, else the sum of the output tensors that need a gradient (whose backward
    is a gradient of ones)."""
    if criterion is not None:
        return criterion(out)
    outs = [t for t in _tensors(out) if t.requires_grad]
    if not outs:
        raise ValueError("the block's output does not require a gradient: nothing to "
                         "time in the backward")
    return sum(t.sum() for t in outs)


class _Clock:
    """Elapsed seconds of a region: CUDA events on a CUDA device (the work is
    asynchronous), the host clock otherwise."""

    def __init__(self, device):
        import torch
        self.cuda = getattr(device, "type", "cpu") == "cuda"
        self._torch = torch

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            cuda = self._torch.cuda
            e0, e1 = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            e0.record()
            out = fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def _tensors(x) -> list:
    import torch
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _storage_key(t) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return None


@dataclass
class Profile:
    """What :func:`profile_stage` measured (seconds, bytes) and how."""

    costs: BlockCosts
    i: float
    repeats: int
    warmup: int
    device: str
    linear_layers: int
    threads: int = 1
    notes: list[str] = field(default_factory=list)
    transport: str | None = None  # where latency/bandwidth/overhead came from
    blocks: int = 1  # timed as a stage of this many fresh blocks (figures per block)

    def describe(self) -> str:
        c = self.costs
        fb = "f + b (no overlap)" if c.fb is None else f"{c.fb * 1e3:9.3f} ms"
        where = self.device if self.device != "cpu" else f"cpu, {self.threads} torch thread(s)"
        what = "one block" if self.blocks == 1 else \
            f"a stage of {self.blocks} blocks (per block below)"
        lines = [f"measured {what} on {where} (median of {self.repeats} after "
                 f"{self.warmup} warm-up, micro-batch of {c.micro_batch} samples):",
                 f"  F  forward                 {c.f * 1e3:9.3f} ms",
                 f"  B  full backward           {c.b * 1e3:9.3f} ms",
                 f"  I  input-gradient backward {self.i * 1e3:9.3f} ms",
                 f"  W  deferred weight pass    {c.w * 1e3:9.3f} ms",
                 f"  F&B                        {fb}",
                 f"  saved for backward         {format_bytes(c.act_bytes)} ({c.act_bytes} B)",
                 f"  parameters                 {format_bytes(c.param_bytes)} ({c.param_bytes} B)",
                 f"  output (stage boundary)    {format_bytes(c.boundary_bytes)} "
                 f"({c.boundary_bytes} B)"]
        bw = "infinite" if math.isinf(c.bandwidth) else f"{c.bandwidth:g} B/s"
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  transport: latency {c.latency:g} s, bandwidth {bw}, runtime overhead "
                     f"{c.overhead:g} s per action ("
                     + (self.transport or "not measured: --latency/--bandwidth/--overhead")
                     + ")")
        return "\n".join(lines)


def profile_stage(factory: Callable[[], tuple] | str, repeats: int = 5, warmup: int = 2,
                  latency: float = 0.0, bandwidth: float = math.inf,
                  micro_batch: int | None = None, overhead: float = 0.0,
                  blocks: int = 1) -> Profile:
    """Measure one block: ``factory()`` returns ``(block, example_micro_batch,
    criterion_or_None)``; the example is a tensor (or a tuple of them, passed as
    ``block(*inputs)``) whose first dimension is the micro-batch size.  ``criterion``,
    when given, maps the block's output to a scalar loss to drive the backward (its own
    cost is not counted in F); otherwise the backward is driven by a gradient of ones.

    * the block is first split as the runtime splits it with
      ``split_linear_weight_grads=True`` (:func:`split_linear_weight_grads`: every
      ``nn.Linear`` through the split's autograd Function), so every figure is of the
      block the runtime runs (and ``--verify`` runs);
    * F: the forward; B: the full backward (``WeightGradStore`` disabled: weight
      gradients computed at once);
    * I and W: a backward with ``WeightGradStore.enabled`` (I) and the deferred closures
      it collected run afterwards (W), as the runtime's ``I`` and ``W`` actions run them.
      A block that defers nothing (no ``nn.Linear`` and no WeightGradStore-aware
      function) gets W = 0, with a note;
    * F&B: through the block class's ``overlapped_forward_backward`` when it has one
      (:func:`_time_overlapped`), else ``None`` (priced as F + B);
    * act_bytes: the unique storages autograd saves for the backward during one forward
      (parameters and buffers excluded); param_bytes: the parameters; boundary_bytes: the
      output tensors.

    Each time is the median of ``repeats`` after ``warmup`` untimed rounds; on a CUDA
    block CUDA events time the device, on CPU the host clock.  The transport is
    measured elsewhere (:func:`measure_runtime`): ``latency``/``bandwidth`` are passed
    through.  The block is used up: it
    keeps the split and the gradients accumulated by the timed rounds (the factory makes
    one for profiling).

    ``micro_batch``: measure at that many samples instead of the example's (the example
    repeated along dim 0 and cut, as ``--verify`` feeds the runtime).  ``overhead`` (the
    runtime's cost per action, :func:`measure_runtime`) is passed through like the
    transport.  ``blocks`` > 1: time an ``nn.Sequential`` of that many fresh blocks from
    the factory (a stage streams its blocks' weights, which one block timed again and
    again keeps in cache) and report every figure per block (the stage's / ``blocks``);
    F&B is then measured on the first block alone."""
    import torch

    from .weight_grad import WeightGradStore, split_linear_weight_grads

    if isinstance(factory, str):
        factory = load_stage_factory(factory)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    _positive_int("blocks", blocks)
    block, inputs, criterion = _call_factory(factory)
    first = block
    if blocks > 1:
        import torch.nn as nn
        block = nn.Sequential(first, *[_call_factory(factory)[0] for _ in range(blocks - 1)])
    if micro_batch is not None:
        _positive_int("micro_batch", micro_batch)
        inputs = tuple(_repeat_rows(t, micro_batch) for t in inputs)
    micro_batch = int(inputs[0].shape[0])
    device = inputs[0].device
    clock = _Clock(device)
    notes: list[str] = []

    def fresh_inputs():
        # a middle stage's input arrives needing a gradient (the runtime sends it back)
        return tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)

    def forward(xs):
        return block(*xs)

    def backward(out):
        _loss(out, criterion).backward()

    params = {id(p): p for p in block.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    owned = {k for t in list(params.values()) + list(block.buffers())
             if (k := _storage_key(t)) is not None}

    # saved activations: one forward under saved_tensors_hooks
    saved: dict[tuple[int, int], int] = {}

    def pack(t):
        k = _storage_key(t)
        if k is not None and k not in owned:
            saved[k] = k[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(fresh_inputs())
    boundary_bytes = sum(t.numel() * t.element_size() for t in _tensors(out))
    backward(out)
    del out
    act_bytes = sum(saved.values())

    # F and B as the runtime runs them with split_linear_weight_grads=True (what --verify
    # runs; zero-bubble schedules need it for their W): the split's autograd Function in
    # every nn.Linear (measured 12-19 % slower forwards than plain nn.Linear on the MLP
    # block of examples/plan_stage.py, CPU); the store disabled, B computes the weight
    # gradients at once
    n_linear = split_linear_weight_grads(block)
    was = WeightGradStore.enabled
    WeightGradStore.enabled = False
    fs, bs = [], []
    try:
        for r in range(warmup + repeats):
            xs = fresh_inputs()
            tf, out = clock.time(lambda: forward(xs))
            tb, _ = clock.time(lambda: backward(out))
            del out
            if r >= warmup:
                fs.append(tf)
                bs.append(tb)
    finally:
        WeightGradStore.enabled = was

    # I and W: the split of the same backward
    WeightGradStore.take()  # start from an empty group
    is_, ws, deferred = [], [], 0
    try:
        for r in range(warmup + repeats):
            out = forward(fresh_inputs())
            WeightGradStore.enabled = True
            try:
                ti, _ = clock.time(lambda: backward(out))
            finally:
                WeightGradStore.enabled = False
            del out
            closures = WeightGradStore.take()
            deferred = len(closures)

            def run_w():
                for fn in closures:
                    fn()
            tw, _ = clock.time(run_w)
            if r >= warmup:
                is_.append(ti)
                ws.append(tw)
    finally:
        WeightGradStore.enabled = was
    f, b, i, w = (statistics.median(v) / blocks for v in (fs, bs, is_, ws))
    act_bytes, param_bytes = act_bytes / blocks, param_bytes / blocks
    if blocks > 1:
        notes.append(f"timed a stage of {blocks} fresh blocks: F, B, I, W, saved and "
                     f"parameter bytes are per block (the stage's / {blocks})")
    if deferred == 0:
        notes.append("the block defers no weight gradient (no nn.Linear and no "
                     "WeightGradStore-aware autograd Function): W = 0, so the W passes of "
                     "zb1p/DualPipe/DualPipeV are empty")
        w = 0.0
    elif n_linear == 0:
        notes.append(f"W from the block's own WeightGradStore-aware functions ({deferred} "
                     "deferred closures)")
    else:
        notes.append(f"W from split_linear_weight_grads: {n_linear} nn.Linear layer(s), "
                     f"{deferred} deferred closure(s) per backward")
    if w > b:
        notes.append(f"the measured W ({w * 1e3:.3f} ms) exceeded the full backward "
                     f"({b * 1e3:.3f} ms, timed separately); W set to B")
        w = b
    fb = None
    if hasattr(type(first), "overlapped_forward_backward"):
        fb = _time_overlapped(first, fresh_inputs, lambda xs: first(*xs), clock, warmup,
                              repeats, notes)
    costs = BlockCosts(f=f, b=b, w=w, fb=fb, act_bytes=round(act_bytes),
                       param_bytes=round(param_bytes), boundary_bytes=int(boundary_bytes),
                       micro_batch=micro_batch, latency=latency, bandwidth=bandwidth,
                       overhead=overhead)
    return Profile(costs, i, repeats, warmup, str(device), n_linear,
                   torch.get_num_threads(), notes, blocks=blocks)


def _time_overlapped(block, fresh_inputs, forward, clock, warmup: int, repeats: int,
                     notes: list[str]) -> float | None:
    """F&B of a block whose class defines ``overlapped_forward_backward``: called as the
    runtime calls it for a middle stage (the forward of one micro-batch with the backward
    of an earlier one, driven by gradients of ones, no criterion), on the block itself.
    ``None`` with a note when the call fails (e.g. it needs the process groups of a real
    run): then F&B is priced as F + B."""
    import torch
    ofb = type(block).overlapped_forward_backward
    times = []
    try:
        for r in range(warmup + repeats):
            outs1 = [t for t in _tensors(forward(fresh_inputs())) if t.requires_grad]
            grads1 = [torch.ones_like(t) for t in outs1]
            xs = fresh_inputs()
            t, _ = clock.time(lambda: ofb(block, xs, None, [], block, None, outs1, grads1))
            if r >= warmup:
                times.append(t)
    except Exception as e:  # the user's overlap code: report, price without overlap
        notes.append(f"the block defines overlapped_forward_backward, but calling it on one "
                     f"block failed ({type(e).__name__}: {e}): fb = f + b (no overlap); put a "
                     "measured 'fb' in a --costs file to price the overlap")
        return None
    notes.append("F&B measured through the block's overlapped_forward_backward (a forward "
                 "and an earlier micro-batch's backward on the same block)")
    return statistics.median(times)


# --------------------------------------------------------------------------- the runtime


@dataclass
class RuntimeCosts:
    """What :func:`measure_runtime` measured on this host: a transfer's one-way
    ``latency`` (s) and ``bandwidth`` (bytes/s, ``math.inf`` when a bigger message was
    not slower), the runtime's ``overhead`` per action (s) and the calibration
    pipeline's median ``step`` (s); ``bare`` is that pipeline's stage measured alone
    (forward, backward), the part of its step that is not the runtime."""

    latency: float
    bandwidth: float
    overhead: float
    step: float
    bare: tuple[float, float] = (0.0, 0.0)  # the calibration stage's own F, B (s)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        bw = "infinite" if math.isinf(self.bandwidth) else f"{self.bandwidth / 1e9:.3f} GB/s"
        return "\n".join([f"measured the runtime on 2 local gloo ranks (transport=\"group\", "
                          "what --verify runs):",
                          f"  transfer latency (one way)  {self.latency * 1e6:9.1f} us",
                          f"  bandwidth                   {bw}",
                          f"  overhead per action         {self.overhead * 1e6:9.1f} us"]
                         + [f"  note: {n}" for n in self.notes])


_CALIBRATION = ("1f1b", 2, 16)  # schedule, ranks, micro-batches of the overhead fit


def _runtime_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank of :func:`measure_runtime`: a ping-pong of a 1-float and a
    ``cfg["floats"]``-float tensor (rank 0 times the round trips), the bare cost of the
    calibration stage in this process, then the calibration pipeline's step spans."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from .api import Pipeline
    from .launch import timed
    torch.manual_seed(0)
    out: dict = {}
    for name, numel in (("small", 1), ("big", cfg["floats"])):
        buf = torch.zeros(numel)
        rounds = []
        for r in range(cfg["warmup"] + cfg["repeats"]):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(cfg["iters"]):
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
            if r >= cfg["warmup"]:
                rounds.append((time.perf_counter() - t0) / cfg["iters"])
        out[name] = statistics.median(rounds)
    # the calibration stage alone: a forward and a backward of nn.Linear(4, 4) on 1 x 4
    lin = nn.Linear(4, 4)
    fs, bs = [], []
    for r in range(cfg["warmup"] + 10 * cfg["repeats"]):
        x = torch.randn(1, 4, requires_grad=True)
        t0 = time.perf_counter()
        y = lin(x)
        t1 = time.perf_counter()
        y.backward(torch.ones_like(y))
        t2 = time.perf_counter()
        if r >= cfg["warmup"]:
            fs.append(t1 - t0)
            bs.append(t2 - t1)
    out["f"], out["b"] = statistics.median(fs), statistics.median(bs)
    _name, _P, N = _CALIBRATION
    pipe = Pipeline(nn.Linear(4, 4), schedule=_name, transport="group",
                    timeout=cfg["timeout"])
    args = (torch.randn(N, 4),) if rank == 0 else ()
    kw = dict(criterion=nn.functional.mse_loss, labels=(torch.randn(N, 4),)) \
        if rank == world - 1 else {}
    spans = []
    try:
        for r in range(cfg["warmup"] + cfg["repeats"]):
            t0, t1, _ = timed(lambda: pipe.step(*args, num_chunks=N, **kw))
            if r >= cfg["warmup"]:
                spans.append((t0, t1))
    finally:
        pipe.close()
    out["spans"] = spans
    return out


def measure_runtime(boundary_bytes: int = 4, threads: int = 1, repeats: int = 7,
                    warmup: int = 3, timeout: float = 300.0) -> RuntimeCosts:
    """Measure what the simulator needs besides the block, on 2 local ranks over gloo
    (:func:`dualpipe.launch.run_ranks`, ``threads`` torch threads each; the transport
    ``--verify`` runs):

    * the one-way transfer ``latency``: half the round trip of a 1-float tensor; the
      ``bandwidth`` from the extra time of a ``boundary_bytes`` one (``math.inf`` when it
      was not slower, e.g. a boundary of a few bytes);
    * the runtime's ``overhead`` per action: a 1F1B pipeline of ``nn.Linear(4, 4)``
      stages on ``1 x 4`` micro-batches (almost all of its step is the runtime itself),
      stepped ``warmup + repeats`` times; ``overhead`` is the per-action cost at which the
      simulated makespan of that schedule -- priced with the stage's bare forward and
      backward, measured alone in the same processes, and the measured latency -- equals
      the measured median step (bisection; 0 when the bare costs already reach it)."""
    from .launch import makespans, run_ranks
    _positive_int("repeats", repeats)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    floats = max(1, -(-int(boundary_bytes) // 4))
    cfg = {"floats": floats, "iters": 20, "repeats": repeats, "warmup": warmup,
           "timeout": min(300.0, timeout)}
    per_rank = run_ranks(_runtime_rank, 2, cfg, timeout=timeout, threads=threads)
    r0 = per_rank[0]
    latency = r0["small"] / 2
    extra = (r0["big"] - r0["small"]) / 2
    notes = []
    if floats > 1 and extra > 0:
        bandwidth = 4 * (floats - 1) / extra
    else:
        bandwidth = math.inf
        if floats > 1:
            notes.append(f"a {4 * floats}-byte transfer was not slower than a 4-byte one: "
                         "bandwidth taken as infinite")
    step = statistics.median(makespans([r["spans"] for r in per_rank]))
    name, P, N = _CALIBRATION
    s = get_schedule(name, P, N)
    f0, b0 = max(r["f"] for r in per_rank), max(r["b"] for r in per_rank)

    def predicted(o: float) -> float:
        return simulate(s, Costs(f=f0 + o, b=b0 + 2 * o, w=0.0, latency=latency)).makespan
    if predicted(0.0) >= step:
        overhead = 0.0
        notes.append("the calibration step was no slower than its bare compute and "
                     "transfers: overhead taken as 0")
    else:
        lo, hi = 0.0, step
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if predicted(mid) < step else (lo, mid)
        overhead = (lo + hi) / 2
    return RuntimeCosts(latency, bandwidth, overhead, step, (f0, b0), notes)


# --------------------------------------------------------------------------- planning


@dataclass
class Candidate:
    """One (schedule, P, DP, N) and what it costs; ``status`` is ``"feasible"``,
    ``"over memory cap"`` or ``"invalid"`` (``reason`` says why for the last two).
    Priced candidates carry ``costs`` (one stage chunk), ``pipeline_time`` (simulated
    makespan of one replica, seconds), ``grad_sync_time`` (the modelled gradient
    synchronisation after it, ``None`` when not modelled), ``step_time`` (their sum),
    ``bubble_fraction`` (idle time of the most idle rank / makespan) and ``memory`` (bytes
    per device, ``activation_memory + param_memory``)."""

    schedule: str
    ranks: int
    dp: int
    chunks: int | None = None
    micro_batch: int | None = None
    stages: int | None = None
    layers_per_stage: int | None = None
    status: str = INVALID
    reason: str | None = None
    rejected_by: str | None = None  # "schedule", "batch", "layers" or "memory"
    step_time: float | None = None
    pipeline_time: float | None = None
    grad_sync_time: float | None = None
    bubble_fraction: float | None = None
    memory: int | None = None
    activation_memory: int | None = None
    param_memory: int | None = None
    costs: Costs | None = None
    #: with a communication SM budget (plan(comm=...)): the measured budget this
    #: candidate is priced at, the one that gives it the shortest step
    comm_sms: int | None = None

    @property
    def priced(self) -> bool:
        return self.step_time is not None

    def to_json(self) -> dict:
        d = asdict(self)
        d["costs"] = None if self.costs is None else {
            "f": self.costs.f, "b": self.costs.b, "w": self.costs.w, "fb": self.costs.pair,
            "latency": self.costs.latency}
        return d

    def label(self) -> str:
        return f"{self.schedule} P={self.ranks} DP={self.dp} N={self.chunks}"


@dataclass
class Plan:
    """All candidates, ranked (priced ones by step time, then memory), and the inputs."""

    block: BlockCosts
    devices: int
    layers: int
    global_batch: int
    memory_cap: int | None
    param_factor: float
    schedules: list[str]
    candidates: list[Candidate]
    min_micro_batch: int = 1
    # (micro-batch size, blocks per rank or None) -> the block's cost measured there
    # (plan(costs_at=..., rank_blocks=...)); empty: every size priced by linear scaling
    # of ``block``
    measured_at: dict[tuple[int, int | None], BlockCosts] = field(default_factory=dict)
    grad_sync: "GradSync | None" = None
    comm: CommBudget | None = None

    @property
    def recommendation(self) -> Candidate | None:
        return next((c for c in self.candidates if c.status == FEASIBLE), None)

    def simulate(self, c: Candidate) -> SimResult:
        """The simulated timeline of a priced candidate (for drawing)."""
        if c.costs is None:
            raise ValueError(f"{c.label()} was not priced: {c.reason}")
        return simulate(get_schedule(c.schedule, c.ranks, c.chunks), c.costs)

    def to_json(self) -> dict:
        rec = self.recommendation
        return {
            "devices": self.devices, "layers": self.layers, "global_batch": self.global_batch,
            "memory_cap": self.memory_cap, "param_factor": self.param_factor,
            "min_micro_batch": self.min_micro_batch, "schedules": self.schedules,
            "cost_model": self.block.to_json(),
            "measured_at": [{"micro_batch": m, "rank_blocks": k, "costs": b.to_json()}
                            for (m, k), b in sorted(self.measured_at.items(),
                                                    key=lambda kv: (kv[0][0], kv[0][1] or 0))],
            "grad_sync": None if self.grad_sync is None else asdict(self.grad_sync),
            "comm_budget": None if self.comm is None else self.comm.to_json(),
            "assumptions": self.assumptions,
            "recommendation": None if rec is None else rec.to_json(),
            "why_none": None if rec is not None else self.why_none(),
            "candidates": [c.to_json() for c in self.candidates],
        }

    @property
    def assumptions(self) -> list[str]:
        out = list(ASSUMPTIONS)
        if self.grad_sync is not None:
            out[0] = ("step time = simulated makespan of one data-parallel replica + the "
                      "gradient synchronisation after it, not overlapped (sync_grads): "
                      "DualPipe's exchange of its stage copies' gradients at the transfer "
                      "cost and a ring all-reduce of the stage modules' gradients over DP "
                      "replicas at "
                      f"{self.grad_sync.bandwidth:g} B/s and {self.grad_sync.latency:g} s "
                      "per hop; the optimizer step is not modelled")
        if self.comm is not None:
            out.append(f"communication SM budget: each candidate priced at each of the "
                       f"{len(self.comm.points)} budgets measured in {self.comm.source} "
                       f"({self.comm.kernels}) and kept at its best; "
                       f"{self.comm.comm_bytes:g} B moved per forward + backward of a block "
                       f"at {self.comm.micro_batch} samples, half unhidden in F and in B "
                       "alone, overlapped in F&B at the measured efficiency "
                       "(dualpipe.comm_budget)")
        if not self.measured_at:
            return out
        sizes = sorted({b.micro_batch for b in self.measured_at.values()})
        scaled = any(b.micro_batch != m for (m, _), b in self.measured_at.items())
        ranks = sorted({k for _, k in self.measured_at if k is not None})
        what = ("block costs, saved activations and boundary bytes measured at "
                + ("each micro-batch size priced" if not scaled else "the example's "
                   "micro-batch") + " (" + ", ".join(map(str, sizes)) + " samples)"
                + ("" if not ranks else ", per block of a stage of as many blocks as one "
                   "rank of the candidate holds (" + ", ".join(map(str, ranks))
                   + " blocks)"))
        return [out[0], what] + ([out[1]] if scaled else []) + out[2:]

    def why_none(self) -> str:
        """Which limit to relax when nothing is feasible."""
        priced = [c for c in self.candidates if c.priced]
        if priced:
            small = min(priced, key=lambda c: c.memory)
            return (f"every valid candidate needs more memory than the cap "
                    f"({format_bytes(self.memory_cap)} per device): relax --memory-cap to at "
                    f"least {format_bytes(small.memory)} ({small.memory} B, {small.label()}), "
                    "or lower --param-factor, or add --devices")
        reasons = sorted({c.reason for c in self.candidates if c.reason})
        return ("no (schedule, P, N) combination is valid for --devices "
                f"{self.devices}, --layers {self.layers}, --global-batch {self.global_batch}"
                f", --schedules {' '.join(self.schedules)} and --min-micro-batch "
                f"{self.min_micro_batch}: change one of them (the layers must split into the "
                "schedule's stages, the global batch into DP replicas of N micro-batches). "
                "Reasons seen: " + "; ".join(reasons[:8])
                + (f"; ... ({len(reasons) - 8} more)" if len(reasons) > 8 else ""))

    def table(self, limit: int | None = None) -> str:
        """The priced candidates ranked, then the invalid ones, one line per
        (schedule, P) and reason."""
        sync, sms = self.grad_sync is not None, self.comm is not None
        rows = [("schedule", "P", "DP", "N", "mb size", "step ms") + (("sync ms",) if sync else ())
                + (("comm SMs",) if sms else ()) + ("bubble", "memory/device", "status")]
        priced = [c for c in self.candidates if c.priced]
        shown = priced if limit is None else priced[:limit]
        for c in shown:
            rows.append((c.schedule, str(c.ranks), str(c.dp), str(c.chunks), str(c.micro_batch),
                         f"{c.step_time * 1e3:.3f}")
                        + ((f"{c.grad_sync_time * 1e3:.3f}",) if sync else ())
                        + ((budget_label(c.comm_sms),) if sms else ())
                        + (f"{c.bubble_fraction:.1%}", format_bytes(c.memory),
                           c.status if c.status == FEASIBLE else f"rejected: {c.reason}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(v.rjust(w) if 0 < i < len(widths) else v.ljust(w)
                           for i, (v, w) in enumerate(zip(r[:-1], widths))) + "  " + r[-1]
                 for r in rows]
        if len(shown) < len(priced):
            lines.append(f"... {len(priced) - len(shown)} more priced candidates (--json for all)")
        # one line per (schedule, what rejected it): the (P, N)s and the last one's reason
        invalid: dict[tuple[str, str | None], list[Candidate]] = {}
        for c in self.candidates:
            if not c.priced:
                invalid.setdefault((c.schedule, c.rejected_by), []).append(c)
        if invalid:
            lines.append("not priced:")
            for (name, _by), cs in sorted(invalid.items(), key=lambda kv: kv[0][0]):
                per_p: dict[int, list[str]] = {}
                for c in cs:
                    per_p.setdefault(c.ranks, [])
                    if c.chunks is not None:
                        per_p[c.ranks].append(str(c.chunks))
                where = "; ".join(f"P={P}" + (f" N={','.join(ns)}" if ns else "")
                                  for P, ns in sorted(per_p.items()))
                lines.append(f"  {name} {where}: {'e.g. ' if len(cs) > 1 else ''}"
                             f"{cs[-1].reason}")
        return "\n".join(lines)


ASSUMPTIONS = [
    "step time = simulated makespan of one data-parallel replica; the gradient "
    "synchronisation (DP all-reduce, DualPipe's copy exchange) and the optimizer step are "
    "not modelled (--grad-sync-bandwidth models the first)",
    "block costs, saved activations and boundary bytes scale linearly with the micro-batch "
    "size (measured at cost_model.micro_batch samples)",
    "a stage of k blocks costs k blocks plus the runtime's overhead per action (F, I, W "
    "once; B and F&B twice); transfer = latency + boundary_bytes * scale / bandwidth",
    "memory = worst rank's peak live activations x k x act_bytes x scale + param_bytes x k x "
    "stages_per_rank x param_factor; allocator slack and workspaces not counted",
]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def plan(block: BlockCosts, devices: int, layers: int, global_batch: int,
         memory_cap: int | None = None, schedules: list[str] | None = None,
         param_factor: float = 4.0, min_micro_batch: int = 1,
         costs_at: Callable[..., BlockCosts] | None = None,
         grad_sync: "GradSync | None" = None, comm: CommBudget | None = None,
         rank_blocks: bool = False) -> Plan:
    """Enumerate and price every candidate (see the module docstring for the model).

    ``costs_at(m)``, when given, is the cost of one block measured at ``m``-sample
    micro-batches (e.g. :func:`profile_stage` with ``micro_batch=m``); it is called once
    per micro-batch size a valid candidate uses and replaces the linear scaling of
    ``block`` (which then only names the cost model in the JSON).  With
    ``rank_blocks=True`` it is called as ``costs_at(m, blocks)``, once per pair, where
    ``blocks`` is how many blocks one rank of the candidate holds (``k`` per stage times
    ``Schedule.stages_per_rank``): the cost per block of a rank that streams that many
    blocks' weights and activations (e.g. :func:`profile_stage` with
    ``blocks=blocks``), which a stage of a few blocks timed in cache underestimates.

    ``grad_sync``: model the gradient synchronisation after the pipeline
    (:func:`grad_sync_time`); ``None``: step time = the pipeline's makespan.

    ``comm``: the block's communication and the measured SM budgets it can run with
    (:mod:`dualpipe.comm_budget`): every candidate is priced at every budget and keeps
    the one that gives it the shortest step (``Candidate.comm_sms``).

    ``schedules`` defaults to every registered one; validity comes from the registry
    (``supports``) and the generators (``get_schedule`` raises for a bad combination),
    so a schedule registered later is planned like the built-in ones.  Micro-batches
    smaller than ``min_micro_batch`` samples are rejected: the linear model prices a
    small micro-batch as cheap as its share of the work, which a real device is not."""
    D = _positive_int("--devices", devices)
    L = _positive_int("--layers", layers)
    G = _positive_int("--global-batch", global_batch)
    if memory_cap is not None and memory_cap < 0:
        raise ValueError(f"--memory-cap must be >= 0 bytes, got {memory_cap}")
    _positive_int("--min-micro-batch", min_micro_batch)
    if rank_blocks and costs_at is None:
        raise ValueError("rank_blocks=True prices each candidate with costs_at(m, blocks): "
                         "pass costs_at too")
    if not _is_number(param_factor) or param_factor < 0:
        raise ValueError(f"--param-factor must be >= 0, got {param_factor!r}")
    names = list(REGISTRY) if not schedules else list(dict.fromkeys(schedules))
    specs = [spec_of(n) for n in names]  # ValueError naming the choices for a typo
    cands: list[Candidate] = []
    measured: dict[tuple[int, int | None], BlockCosts] = {}
    # id(block priced) -> (that block, [(comm SMs, the block at that budget)]); the block
    # is kept so its id stays its own
    at_budgets: dict[int, tuple[BlockCosts, list[tuple[int, BlockCosts]]]] = {}
    for spec in specs:
        for P in _divisors(D):
            DP = D // P
            if not spec.supports(P):
                try:
                    placement_schedule(spec.name, P)
                    why = f"{spec.title} does not run on {P} ranks"
                except ValueError as e:
                    why = str(e)
                cands.append(Candidate(spec.name, P, DP, reason=why, rejected_by="schedule"))
                continue
            if G % DP:
                cands.append(Candidate(spec.name, P, DP, rejected_by="batch", reason=(
                    f"the global batch {G} does not split into {DP} data-parallel replicas")))
                continue
            S = placement_schedule(spec.name, P).num_stages
            if L % S:
                cands.append(Candidate(spec.name, P, DP, stages=S, rejected_by="layers", reason=(
                    f"{L} layers do not split into {S} stages")))
                continue
            k = L // S
            per_replica = G // DP
            for N in _divisors(per_replica):
                m = per_replica // N
                c = Candidate(spec.name, P, DP, N, m, S, k)
                cands.append(c)
                if m < min_micro_batch:
                    c.reason, c.rejected_by = (f"{m}-sample micro-batches are below "
                                               f"--min-micro-batch {min_micro_batch}"), "batch"
                    continue
                try:
                    s = get_schedule(spec.name, P, N)
                except ValueError as e:
                    c.reason, c.rejected_by = str(e), "schedule"
                    continue
                at = block
                if costs_at is not None:
                    key = (m, k * s.stages_per_rank if rank_blocks else None)
                    if key not in measured:
                        measured[key] = costs_at(*key) if rank_blocks else costs_at(m)
                    at = measured[key]
                if comm is None:
                    _price(c, s, at, k, m, memory_cap, param_factor, grad_sync)
                else:  # the block at each budget depends only on the block priced
                    if id(at) not in at_budgets:
                        at_budgets[id(at)] = (at, [(pt.comm_sms, comm.costs_at(at, pt))
                                                   for pt in comm.points])
                    _price_budgets(c, s, at_budgets[id(at)][1], k, m, memory_cap,
                                   param_factor, grad_sync)
    cands.sort(key=_rank_key)
    return Plan(block, D, L, G, memory_cap, float(param_factor), names, cands,
                min_micro_batch, measured, grad_sync, comm)


def _rank_key(c: Candidate) -> tuple:
    """Feasible first, then over the cap, then invalid; by step time (equal to 9
    significant digits counts as a tie: sums of the same costs in another order differ
    in the last bits), then memory, then name, P and N for a stable order."""
    t = float(f"{c.step_time:.9g}") if c.priced else 0.0
    return (not c.priced, c.status != FEASIBLE, t, c.memory or 0, c.schedule, c.ranks,
            c.chunks or 0)


#: how many times each action kind is charged the runtime's overhead per action: F, I
#: and W run as one action each; B = I + W and an F&B pair as two
OVERHEAD_ACTIONS = {F: 1, I: 1, W: 1, B: 2, FB: 2}


def charged_costs(f: float, b: float, w: float, fb: float | None, overhead: float,
                  latency: float) -> Costs:
    """A stage's compute per action kind plus the runtime's ``overhead`` per action
    (:data:`OVERHEAD_ACTIONS`), as the simulator prices it."""
    n = OVERHEAD_ACTIONS
    return Costs(f=f + n[F] * overhead, b=b + n[B] * overhead, w=w + n[W] * overhead,
                 fb=None if fb is None else fb + n[FB] * overhead, latency=latency)


def compute_of(costs: Costs, overhead: float) -> dict[str, float]:
    """The inverse of :func:`charged_costs`: each action kind's compute (``I`` = B - W)
    without the overhead it was charged."""
    n = OVERHEAD_ACTIONS
    return {F: costs.f - n[F] * overhead, B: costs.b - n[B] * overhead,
            I: costs.b - costs.w - n[I] * overhead, W: costs.w - n[W] * overhead,
            FB: costs.pair - n[FB] * overhead}


def stage_costs(block: BlockCosts, k: int, m: int) -> Costs:
    """What the simulator prices for a stage of ``k`` blocks on ``m``-sample
    micro-batches: each block's time scaled by ``m / block.micro_batch``, plus the
    runtime's ``overhead`` per action (:func:`charged_costs`), and a transfer of
    ``latency + boundary_bytes * scale / bandwidth``."""
    scale = m / block.micro_batch
    per = k * scale
    return charged_costs(block.f * per, block.b * per, block.w * per,
                         None if block.fb is None else block.fb * per, block.overhead,
                         block.latency + block.boundary_bytes * scale / block.bandwidth)


@dataclass(frozen=True)
class GradSync:
    """The network the data-parallel gradient all-reduce runs on: ``bandwidth`` in bytes
    per second (per rank, ring algorithm) and ``latency`` in seconds per hop.  This host
    cannot measure it (the replicas are other hosts); give your cluster's figures."""

    bandwidth: float
    latency: float = 0.0

    def __post_init__(self):
        if not _is_number(self.bandwidth) or not self.bandwidth > 0:
            raise ValueError(f"--grad-sync-bandwidth must be > 0 bytes/s, got "
                             f"{self.bandwidth!r}")
        if not _is_number(self.latency) or not math.isfinite(self.latency) or self.latency < 0:
            raise ValueError(f"--grad-sync-latency must be a finite number of seconds >= 0, "
                             f"got {self.latency!r}")


def grad_sync_time(sync: GradSync | None, block: BlockCosts, s, k: int, dp: int) -> float:
    """Seconds of gradient synchronisation after one step of schedule ``s`` with ``k``
    blocks per stage on ``dp`` replicas, as :func:`dualpipe.training.sync_grads` runs it.

    * No duplicated stages: for ``dp > 1`` a ring all-reduce of the gradients of every
      stage module the rank holds, ``2 (dp - 1) / dp * bytes / sync.bandwidth + 2 (dp -
      1) * sync.latency``, after a small all-reduce of which parameters have a gradient
      (``2 (dp - 1) * sync.latency``): ``all_reduce_grads``.
    * DualPipe, ``dp = 1``: one swap of both stage modules' gradients with the partner
      rank holding their other copies (``reduce_dualpipe_grads``), ``latency + bytes /
      bandwidth`` at the pipeline's transfer figures.
    * DualPipe, ``dp > 1``: the second copy to the stage's primary (one module), the
      all-reduce of the primary copies alone (half the rank's gradients, priced as
      above), the result back into the second copies (one module).

    ``sync`` may be ``None`` only for ``dp = 1``."""
    return sum(sync_parts(sync, block, s, k, dp))


def sync_parts(sync: GradSync | None, block: BlockCosts, s, k: int,
               dp: int) -> tuple[float, float]:
    """:func:`grad_sync_time` in its two parts: ``(exchange, all_reduce)`` seconds."""
    stage_bytes = block.param_bytes * k
    reduced = stage_bytes * s.stages_per_rank  # what the all-reduce moves
    exchange = all_reduce = 0.0
    if s.duplicated_stages:
        half = stage_bytes * (s.stages_per_rank // 2)
        if dp == 1:
            exchange = block.latency + 2 * half / block.bandwidth
        else:
            exchange = 2 * (block.latency + half / block.bandwidth)
            reduced = half
    if dp > 1:
        if sync is None:
            raise ValueError(f"the gradient all-reduce over DP={dp} replicas needs its "
                             "network's figures (GradSync, --grad-sync-bandwidth)")
        all_reduce = (2 * (dp - 1) / dp * reduced / sync.bandwidth
                      + 2 * 2 * (dp - 1) * sync.latency)
    return exchange, all_reduce


def _line(sizes: tuple[int, int], seconds: tuple[float, float]) -> tuple[float, float]:
    """Intercept and slope (seconds per byte, ``>= 0``) of the line through two timed
    transfers, ``seconds[i]`` for ``sizes[i]`` bytes, the small one first."""
    (n0, n1), (t0, t1) = sizes, seconds
    if not n1 > n0 >= 0:
        raise ValueError(f"want two sizes, small first, got {sizes}")
    slope = max(0.0, (t1 - t0) / (n1 - n0))
    return max(0.0, t0 - slope * n0), slope


def fit_all_reduce(dp: int, sizes: tuple[int, int], seconds: tuple[float, float]) -> GradSync:
    """The ring model of :func:`grad_sync_time` fitted to two measured all-reduces over
    ``dp`` ranks: ``seconds[i]`` for ``sizes[i]`` bytes (the first small: latency-bound).
    ``t(n) = 2 (dp - 1) latency + 2 (dp - 1) / dp * n / bandwidth``; a large one no
    slower (noise) gives an infinite bandwidth."""
    if dp < 2:
        raise ValueError(f"an all-reduce needs dp >= 2 ranks, got {dp}")
    intercept, slope = _line(sizes, seconds)
    hops = 2 * (dp - 1)
    return GradSync((hops / dp) / slope if slope > 0 else math.inf, intercept / hops)


def fit_transfer(sizes: tuple[int, int], seconds: tuple[float, float]) -> tuple[float, float]:
    """``(latency, bandwidth)`` of a point-to-point transfer, ``t(n) = latency + n /
    bandwidth``, fitted to two measured times (as :func:`fit_all_reduce`)."""
    intercept, slope = _line(sizes, seconds)
    return intercept, 1 / slope if slope > 0 else math.inf


def _price(c: Candidate, s, block: BlockCosts, k: int, m: int, memory_cap: int | None,
           param_factor: float, grad_sync: GradSync | None = None) -> None:
    """Price ``c`` with ``block``, the cost of one block measured at ``block.micro_batch``
    samples (linear scaling to ``m``; a block profiled at ``m`` itself has scale 1)."""
    scale = m / block.micro_batch
    c.costs = stage_costs(block, k, m)
    res = simulate(s, c.costs)
    c.pipeline_time = res.makespan
    if grad_sync is not None:
        c.grad_sync_time = grad_sync_time(grad_sync, block, s, k, c.dp)
    c.step_time = c.pipeline_time + (c.grad_sync_time or 0.0)
    c.bubble_fraction = res.bubble / res.makespan if res.makespan > 0 else 0.0
    c.activation_memory = math.ceil(max(res.peak_activations) * k * block.act_bytes * scale)
    c.param_memory = math.ceil(block.param_bytes * k * s.stages_per_rank * param_factor)
    c.memory = c.activation_memory + c.param_memory
    if memory_cap is not None and c.memory > memory_cap:
        c.status, c.rejected_by = OVER_MEMORY, "memory"
        c.reason = (f"needs {format_bytes(c.memory)} per device, over the cap "
                    f"{format_bytes(memory_cap)}")
    else:
        c.status = FEASIBLE


def _price_budgets(c: Candidate, s, budgets: list[tuple[int, BlockCosts]], k: int, m: int,
                   memory_cap: int | None, param_factor: float,
                   grad_sync: GradSync | None) -> None:
    """:func:`_price` at every measured communication SM budget (``budgets``: each
    budget's SM count and the block's costs there, :meth:`CommBudget.costs_at`); ``c``
    keeps the budget with the shortest step (the first, fewest comm SMs, on a tie)."""
    best = None
    for comm_sms, at in budgets:
        trial = replace(c)
        _price(trial, s, at, k, m, memory_cap, param_factor, grad_sync)
        trial.comm_sms = comm_sms
        if best is None or trial.step_time < best.step_time:
            best = trial
    c.__dict__.update(best.__dict__)


# --------------------------------------------------------------------------- verification


@dataclass
class Verification:
    """One candidate run through the real runtime (:func:`verify`): ``measured`` is the
    median step makespan over ``steps`` (max end - min start across the ranks),
    ``predicted`` the simulated pipeline makespan of exactly what ran (DP = 1, the candidate's P,
    N and micro-batch size), ``ratio = measured / predicted`` (``None`` for a prediction
    of 0); ``note`` says what differs from the candidate (DP, cores shared)."""

    role: str  # "recommendation" or "runner-up"
    candidate: Candidate
    predicted: float | None = None
    measured: float | None = None
    ratio: float | None = None
    step_times: list[float] = field(default_factory=list)
    global_batch_run: int | None = None
    threads: int | None = None
    note: str | None = None
    #: per action kind: the mean and median duration the runtime measured, the predicted
    #: compute (the profile, without the overhead per action) and how many ran
    actions: dict[str, dict] = field(default_factory=dict)
    #: the simulated makespan with the measured action costs (same schedule, latency):
    #: ``measured / replayed`` is the model's own error, ``replayed / predicted`` the
    #: profile's
    replayed: float | None = None
    replay_ratio: float | None = None
    #: measured: the runtime's mean time between two actions that was not a wait;
    #: predicted: the plan's overhead per action (``None`` if not given)
    between: float | None = None
    overhead: float | None = None
    #: with ``verify(profile=...)``: the block re-profiled by every rank at the
    #: candidate's micro-batch before its first step and after its last (per-block
    #: seconds: ``median`` of f, b, w and ``each`` profile), and the schedule priced with
    #: that median: ``measured / reprofiled`` is the error of a profile taken with the run
    profiled: dict | None = None
    reprofiled: float | None = None
    reprofile_ratio: float | None = None
    #: max / min of F + B over those profiles (1.0: the machine's speed held still)
    profile_spread: float | None = None
    #: the data-parallel replicas that ran (the candidate's DP, or 1: ``note`` says why)
    replicas: int = 1
    #: the gradient synchronisation after each step (DualPipe's exchange, the all-reduce
    #: over the replicas), when there is one: ``sync_times`` per measured step (the last
    #: rank's end of it less the last rank's end of ``step()``), their median, the
    #: prediction (:func:`grad_sync_time`, the all-reduce at this host's figures:
    #: ``all_reduce``) and ``sync_ratio``; ``with_sync_*``: the whole step, ``step()``
    #: and the synchronisation, measured against ``predicted + sync_predicted``
    sync_times: list[float] = field(default_factory=list)
    sync_measured: float | None = None
    sync_predicted: float | None = None
    sync_ratio: float | None = None
    #: of ``sync_measured``, the seconds the last rank to finish ``step()`` (no other
    #: rank is still to arrive; with DualPipe x DP its second swap may wait for the
    #: partner's all-reduce) spent inside the all-reduces and in DualPipe's exchange (median over the
    #: steps), each against the model's part (the exchange at this host's point-to-point
    #: figures: ``p2p``); the rest is ``sync_grads`` packing the gradients into buffers
    #: and back
    in_all_reduce: float | None = None
    all_reduce_predicted: float | None = None
    all_reduce_ratio: float | None = None
    in_exchange: float | None = None
    exchange_predicted: float | None = None
    exchange_ratio: float | None = None
    with_sync_measured: float | None = None
    with_sync_predicted: float | None = None
    with_sync_ratio: float | None = None
    #: this host's all-reduce over the replicas, fitted to two sizes timed in the run
    #: (:func:`fit_all_reduce`): ``{"latency", "bandwidth", "sizes", "seconds"}``
    all_reduce: dict | None = None
    #: with duplicated stages, this host's swap between partner ranks (both sending at
    #: once), fitted the same way (:func:`fit_transfer`): ``{"latency", "bandwidth",
    #: "sizes", "seconds"}``
    p2p: dict | None = None

    def to_json(self) -> dict:
        c = self.candidate
        d = {"role": self.role, "schedule": c.schedule, "ranks": c.ranks, "dp": c.dp,
             "chunks": c.chunks, "micro_batch": c.micro_batch, "status": c.status}
        d.update({k: v for k, v in asdict(self).items() if k not in ("role", "candidate")})
        for key in ("all_reduce", "p2p"):  # a fitted infinite bandwidth: null, as in
            if d.get(key) and math.isinf(d[key]["bandwidth"]):  # BlockCosts.to_json
                d[key] = {**d[key], "bandwidth": None}
        return d


def verify_candidates(p: Plan, max_ranks: int = 4) -> tuple[list[tuple[str, Candidate]],
                                                            list[str]]:
    """What ``--verify`` runs: the recommendation and one runner-up, the best-ranked
    priced candidate (feasible first, then over the memory cap: the table's order) with
    another schedule or P; candidates on more than ``max_ranks`` pipeline ranks are
    skipped.  Returns ``([(role, candidate)], notes)``."""
    rec = p.recommendation
    picked: list[tuple[str, Candidate]] = []
    notes: list[str] = []
    if rec is None:
        return picked, ["nothing feasible: no recommendation to verify"]
    if rec.ranks <= max_ranks:
        picked.append(("recommendation", rec))
    else:
        notes.append(f"recommendation {rec.label()} not run: P={rec.ranks} ranks is more "
                     f"than --verify-max-ranks {max_ranks}")
    skipped = []
    for c in p.candidates:
        if not c.priced or c is rec or (c.schedule, c.ranks) == (rec.schedule, rec.ranks):
            continue
        if c.ranks > max_ranks:
            skipped.append(c)
            continue
        picked.append(("runner-up", c))
        break
    else:
        notes.append("no runner-up with another schedule or P was priced"
                     + (f" on at most {max_ranks} ranks" if skipped else ""))
    if skipped:
        notes.append(f"runner-up: skipped {len(skipped)} better-ranked candidate(s) on more "
                     f"than --verify-max-ranks {max_ranks} ranks (first: {skipped[0].label()})")
    return picked, notes


def _repeat_rows(t, rows: int):
    """``t`` (``[r, ...]``) repeated along dim 0 and cut to ``rows`` rows."""
    reps = -(-rows // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:rows]


#: the two all-reduce sizes (bytes) a data-parallel verification fits this host's
#: all-reduce with (:func:`fit_all_reduce`): latency-bound, then bandwidth-bound
ALL_REDUCE_SIZES = (4, 4 << 20)


#: seconds every rank pauses before each timed all-reduce (and swap) of the
#: calibration: the synchronisation after a step follows compute, not another
#: collective, and on this VM a small gloo all-reduce right after another took 80-250
#: us, after a 50 ms pause 350-500 us (after this 20 ms pause: ~400 us, in the verify
#: runs of docs/performance.md)
ALL_REDUCE_PAUSE = 0.02


def _time_op(op: Callable[[], Any], barrier: Callable[[], Any], repeats: int,
             pause: float = ALL_REDUCE_PAUSE) -> float:
    """Median seconds of ``op()``, each time after ``barrier()`` and a pause of ``pause``
    seconds (the calibration of a verify run's all-reduce and partner swap)."""
    times = []
    for _ in range(repeats):
        barrier()
        time.sleep(pause)
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_all_reduce(group, nbytes: int, repeats: int) -> float:
    """One all-reduce of ``nbytes`` (float32) over ``group`` (:func:`_time_op`, the
    group's barrier)."""
    import torch
    import torch.distributed as dist
    buf = torch.zeros(max(1, nbytes // 4))
    return _time_op(lambda: dist.all_reduce(buf, group=group),
                    lambda: dist.barrier(group=group), repeats)


def _time_exchange(partner: int, nbytes: int, repeats: int) -> float:
    """A swap of ``nbytes`` (float32) between this rank and global rank ``partner``,
    both sending at once (as ``sync_grads`` does; :func:`_time_op`, every rank's
    barrier).  One tensor on the default group: ``sync_grads``' swaps send two (the
    gradients and their has-gradient flags) on the pipeline's own group, one small
    message more than this times."""
    import torch
    import torch.distributed as dist
    mine, theirs = torch.zeros(max(1, nbytes // 4)), torch.empty(max(1, nbytes // 4))

    def swap():
        for h in [dist.irecv(theirs, partner), dist.isend(mine, partner)]:
            h.wait()
    return _time_op(swap, dist.barrier, repeats)


def _verify_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank of a :func:`verify` run: ``world = P * cfg["replicas"]`` ranks, replica
    ``d`` on ranks ``d*P .. d*P + P-1``, each replica one pipeline group.  The rank's
    stage modules (``nn.Sequential`` of ``k`` fresh blocks from the factory each), its
    share of the batch (the example micro-batch repeated to ``micro_batch`` rows per
    micro-batch), then ``warmup + steps`` training steps, each followed by the gradient
    synchronisation a training step runs (:func:`dualpipe.training.sync_grads`, over the
    replicas when there are several; ``cfg["sync"]``).  Returns, from the measured steps, ``{"spans": [(start,
    end)], "sync_ends": [end], "actions": {"F": [s, ...], "I": ..., ...}, "between": [s,
    gaps]}``: the steps' times (``step()`` alone), when the synchronisation after each
    ended and how long of it this rank spent in DualPipe's exchange and inside the
    all-reduces (``"sync_parts"``: ``(exchange, all-reduce)`` per step), the durations of their compute actions by kind, and the time between
    consecutive compute actions that was not a wait on a receive (the runtime's own work
    between actions: posting, bookkeeping) with the number of such gaps (all from the
    runtime's own timeline); ``"all_reduce"``: with several replicas, this host's
    all-reduce timed over them before the first step (median seconds at each of
    :data:`ALL_REDUCE_SIZES`); ``"p2p"``: with duplicated stages, a swap with the
    partner rank timed the same way; and ``"profiled"``: with ``cfg["profile"]``, the block's
    per-block F, B, W and F&B from :func:`profile_stage` before the first step and
    after the last (every rank past its last step first)."""
    import torch.distributed as dist
    import torch.nn as nn

    from .api import Pipeline
    from .launch import timed
    from .training import partner_rank, sync_grads
    factory = cfg["stage"]
    if isinstance(factory, str):
        factory = load_stage_factory(factory)
    replicas = cfg.get("replicas", 1)
    P = world // replicas
    group, dp_group = None, None
    if replicas > 1:  # every rank creates every group, in the same order
        pipes = [dist.new_group([d * P + r for r in range(P)]) for d in range(replicas)]
        dps = [dist.new_group([d * P + r for d in range(replicas)]) for r in range(P)]
        group, dp_group = pipes[rank // P], dps[rank % P]
    world_rank, rank = rank, rank % P  # the pipeline rank
    s = get_schedule(cfg["schedule"], P, cfg["chunks"])
    mods = []
    for _ in s.placement[rank]:
        made = [_call_factory(factory) for _ in range(cfg["k"])]
        mods.append(nn.Sequential(*[blk for blk, _x, _c in made]))
    _blk, example, criterion = made[-1]
    pipe = Pipeline(mods, process_group=group, schedule=cfg["schedule"],
                    split_linear_weight_grads=True, transport="group",
                    timeout=min(300.0, cfg["timeout"]))
    ins = s.input_microbatches(rank)
    inputs = () if ins is None else tuple(
        _repeat_rows(_repeat_rows(t, cfg["micro_batch"]), cfg["micro_batch"] * len(ins))
        for t in example)

    def loss(*outs):
        return _loss(outs[0] if len(outs) == 1 else outs, criterion)
    spans: list[tuple[float, float]] = []
    sync_ends: list[float] = []
    sync_parts: list[tuple[float, float]] = []
    actions: dict[str, list[float]] = {}
    between = [0.0, 0]
    profiled: list[dict] = []
    all_reduce: list[float] = []
    p2p: list[float] = []

    def reprofile():
        # the planner's own profile of the block, at this micro-batch, in this rank, now
        # (before the first step and after the last: the machine's speed may drift
        # between the plan and the run, and during the run)
        if cfg.get("profile") is not None:
            args = dict(cfg["profile"])
            args.setdefault("micro_batch", cfg["micro_batch"])
            c = profile_stage(factory, **args).costs
            profiled.append({"f": c.f, "b": c.b, "w": c.w, "fb": c.fb})

    def sync() -> tuple[float, float]:
        # sync_grads, and the seconds of it spent in DualPipe's exchanges (the pipeline's
        # exchange() calls) and inside the all-reduces (torch.distributed.all_reduce),
        # each timed for its calls' duration (this spawned rank's own objects)
        spent = {"exchange": 0.0, "all_reduce": 0.0}

        def timing(fn, key):
            def timed_fn(*args, **kw):
                t = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    spent[key] += time.perf_counter() - t
            return timed_fn
        real = dist.all_reduce
        dist.all_reduce = timing(real, "all_reduce")
        pipe.exchange = timing(pipe.exchange, "exchange")
        try:
            sync_grads(pipe, dp_group)
        finally:
            dist.all_reduce = real
            del pipe.exchange  # the class's own again
        return spent["exchange"], spent["all_reduce"]
    try:
        reprofile()  # inside: a failing profile still closes the pipeline
        if dp_group is not None:
            all_reduce = [_time_all_reduce(dp_group, n, 7) for n in ALL_REDUCE_SIZES]
        if cfg.get("sync") and s.duplicated_stages:  # the partner in this replica
            partner = world_rank - rank + partner_rank(s, rank)
            p2p = [_time_exchange(partner, n, 7) for n in ALL_REDUCE_SIZES]
        for i in range(cfg["warmup"] + cfg["steps"]):
            pipe.zero_grad(set_to_none=True)
            t0, t1, _ = timed(lambda: pipe.step(*inputs, num_chunks=cfg["chunks"],
                                                criterion=loss))
            parts = sync() if cfg.get("sync") else (0.0, 0.0)
            t2 = time.perf_counter()
            if i >= cfg["warmup"]:
                spans.append((t0, t1))
                sync_ends.append(t2)
                sync_parts.append(parts)
                compute = []
                waited = 0.0
                for iv in pipe.timeline:
                    if iv.lane == "compute":
                        compute.append(iv)
                        actions.setdefault(iv.action.kind, []).append(iv.end - iv.start)
                    elif compute:  # a wait after the first action (before it: start-up)
                        waited += iv.end - iv.start
                if len(compute) > 1:
                    busy = sum(iv.end - iv.start for iv in compute)
                    between[0] += max(0.0, compute[-1].end - compute[0].start - busy - waited)
                    between[1] += len(compute) - 1
        if cfg.get("profile") is not None:
            # every rank is done with its last measured step before any profiles again
            # (the barrier has the process group's timeout, run_ranks')
            dist.barrier()
        reprofile()
    finally:
        pipe.close()
    return {"spans": spans, "sync_ends": sync_ends, "sync_parts": sync_parts,
            "actions": actions, "between": between, "profiled": profiled,
            "all_reduce": all_reduce, "p2p": p2p}


def measured_costs(predicted: Costs, actions: dict[str, list[float]],
                   between: float = 0.0) -> Costs:
    """``predicted`` with each action's cost replaced by the mean the runtime measured
    for that kind (``actions``: durations by kind, see :func:`_verify_rank`; the mean,
    not the median: a step's makespan adds every action's time, tail included) plus
    ``between``, the runtime's measured time between two actions; kinds that did not
    run keep their predicted cost.  ``b`` is the measured B, else I + W (each with its
    ``between``: the runtime runs them as two actions)."""
    mean = {k: statistics.fmean(v) + between for k, v in actions.items() if v}
    f = mean.get(F, predicted.f)
    w = mean.get(W, predicted.w)
    if B in mean:
        b = mean[B]
    elif I in mean:
        b = mean[I] + w
    else:
        b = predicted.b
    fb = mean.get(FB, predicted.fb)
    return Costs(f=f, b=max(b, w), w=w, fb=fb, latency=predicted.latency)


def _ratio(measured: float, predicted: float | None) -> float | None:
    """``measured / predicted``; ``None`` for a prediction of 0 (or none)."""
    return measured / predicted if predicted else None


#: a verification notes an unsteady machine when the block's re-profiles differ by more
STEADY = 0.05


def verify(c: Candidate, stage: str | Callable[[], tuple], role: str = "candidate",
           steps: int = 5, warmup: int = 2, threads: int = 1,
           timeout: float = 600.0, overhead: float | None = None,
           profile: dict | None = None, replicas: int | None = None,
           block: BlockCosts | None = None) -> Verification:
    """Run candidate ``c`` of a plan through the runtime on this machine: ``c.ranks``
    local gloo ranks per replica (:func:`dualpipe.launch.run_ranks`, ``threads`` torch
    threads each), ``replicas`` data-parallel replicas (default the candidate's DP; 1
    runs one and says so), the stages built from ``stage`` (a ``module:function``
    reference or a module-level function, importable by the spawned ranks),
    ``split_linear_weight_grads=True`` and ``transport="group"``.  ``measured`` /
    ``predicted`` is the pipeline: ``step()``'s makespan against the simulated makespan
    of one replica (the same micro-batch size and count: the candidate's own
    ``pipeline_time``).

    After every step the ranks synchronise the gradients as a training step does
    (``sync_grads``: DualPipe's exchange of its duplicated stages, the all-reduce over
    the replicas),
    timed apart from ``step()`` (``Verification.sync_*``) and predicted with
    :func:`grad_sync_time` from ``block`` (the plan's block: parameter bytes, transfer
    latency and bandwidth; ``None``: not predicted), the all-reduce at this host's
    latency and bandwidth fitted to two sizes timed over the replicas before the first
    step (:func:`fit_all_reduce`, :data:`ALL_REDUCE_SIZES`): the data-parallel part of
    the model checked against this host's network (the plan's ``--grad-sync-*`` figures
    are the cluster's, which this host cannot measure).

    Where an error comes from (:func:`breakdown`): each action kind's measured mean
    against its predicted cost, the runtime's measured time between actions against
    ``overhead`` (the plan's per-action overhead, when given), and the schedule replayed
    by the simulator with the measured figures (:func:`measured_costs`).

    ``profile`` (``{"blocks": K, "repeats": r, "warmup": w}``, :func:`profile_stage`'s
    arguments; ``"micro_batch"`` to profile at another size and scale linearly, as a plan
    without ``--each-micro-batch`` does): every rank also profiles the block (at the
    candidate's micro-batch by default) right
    before its first step and after its last, and the schedule is priced again with the
    median of those profiles (``Verification.reprofiled``): the same prediction from a
    profile taken with the run instead of minutes before it, so ``measured /
    reprofiled`` is the planner's error without the machine's drift in between
    (``reprofiled / predicted``)."""
    from .launch import makespans, run_ranks
    if not c.priced:
        raise ValueError(f"{c.label()} was not priced: {c.reason}")
    _positive_int("--verify-steps", steps)
    replicas = c.dp if replicas is None else _positive_int("replicas", replicas)
    if replicas not in (1, c.dp):
        raise ValueError(f"replicas must be 1 or the candidate's DP={c.dp}, got {replicas}")
    g_run = c.micro_batch * c.chunks
    s = get_schedule(c.schedule, c.ranks, c.chunks)
    # the same micro-batch size and count: one replica's makespan, the candidate's own
    v = Verification(role, c, predicted=c.pipeline_time, global_batch_run=g_run * replicas,
                     threads=threads, replicas=replicas)
    said = []
    if replicas < c.dp:
        said.append(f"ran DP=1 (one replica of the candidate's {c.dp}), global batch {g_run} "
                    f"= {c.micro_batch} x {c.chunks}: the data-parallel part is not verified")
    world = c.ranks * replicas
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and world * threads > cores:
        said.append(f"{world} ranks x {threads} thread(s) on {cores} core(s): the ranks "
                    "compete for cores, which the profile (one process) did not")
    v.note = "; ".join(said) or None
    sync = replicas > 1 or s.duplicated_stages
    cfg = {"stage": stage, "schedule": c.schedule, "chunks": c.chunks, "k": c.layers_per_stage,
           "micro_batch": c.micro_batch, "warmup": warmup, "steps": steps,
           "timeout": timeout, "profile": profile, "replicas": replicas, "sync": sync}
    per_rank = run_ranks(_verify_rank, world, cfg, timeout=timeout, threads=threads)
    # each replica's makespan (its own P ranks), the slowest replica's per step
    by_replica = [makespans([r["spans"] for r in per_rank[d * c.ranks:(d + 1) * c.ranks]])
                  for d in range(replicas)]
    v.step_times = [max(ts) for ts in zip(*by_replica)]
    v.measured = statistics.median(v.step_times)
    v.ratio = _ratio(v.measured, v.predicted)
    if sync:
        n = len(v.step_times)
        v.sync_times = [max(r["sync_ends"][i] for r in per_rank)
                        - max(r["spans"][i][1] for r in per_rank) for i in range(n)]
        v.sync_measured = statistics.median(v.sync_times)
        whole = [max(r["sync_ends"][i] for r in per_rank)
                 - min(r["spans"][i][0] for r in per_rank) for i in range(n)]
        v.with_sync_measured = statistics.median(whole)
        # the last rank to finish step() waits for no other rank to arrive (with DualPipe
        # x DP it may still wait in the second swap for its partner's all-reduce)
        last = [max(range(len(per_rank)), key=lambda j: per_rank[j]["spans"][i][1])
                for i in range(n)]

        def part(x: int) -> float:  # 0: the exchange, 1: inside the all-reduces
            return statistics.median(per_rank[j]["sync_parts"][i][x]
                                     for i, j in enumerate(last))

        def fitted(key: str) -> tuple[tuple[float, ...], dict]:
            # each size's median over the ranks, and the record of a fit to them
            secs = tuple(statistics.median(r[key][j] for r in per_rank)
                         for j in range(len(ALL_REDUCE_SIZES)))
            return secs, {"sizes": list(ALL_REDUCE_SIZES), "seconds": list(secs)}
        host, via = None, block
        if replicas > 1:
            v.in_all_reduce = part(1)
            secs, v.all_reduce = fitted("all_reduce")
            host = fit_all_reduce(replicas, ALL_REDUCE_SIZES, secs)
            v.all_reduce.update(latency=host.latency, bandwidth=host.bandwidth)
        if s.duplicated_stages:
            v.in_exchange = part(0)
            secs, v.p2p = fitted("p2p")
            lat, bw = fit_transfer(ALL_REDUCE_SIZES, secs)
            v.p2p.update(latency=lat, bandwidth=bw)
            via = None if block is None else block.with_transport(lat, bw)
        if block is not None:
            exchange, reduce = sync_parts(host, via, s, c.layers_per_stage, replicas)
            v.sync_predicted = exchange + reduce
            v.sync_ratio = _ratio(v.sync_measured, v.sync_predicted)
            v.with_sync_predicted = v.predicted + v.sync_predicted
            v.with_sync_ratio = _ratio(v.with_sync_measured, v.with_sync_predicted)
            if s.duplicated_stages:
                v.exchange_predicted = exchange
                v.exchange_ratio = _ratio(v.in_exchange, exchange)
            if replicas > 1:
                v.all_reduce_predicted = reduce
                v.all_reduce_ratio = _ratio(v.in_all_reduce, reduce)
    actions: dict[str, list[float]] = {}
    for r in per_rank:
        for k, durations in r["actions"].items():
            actions.setdefault(k, []).extend(durations)
    gaps = sum(r["between"][1] for r in per_rank)
    v.between = sum(r["between"][0] for r in per_rank) / gaps if gaps else 0.0
    v.overhead = overhead
    if c.costs is not None and actions:
        # the profiled compute of each kind: the priced cost less its overhead
        want = compute_of(c.costs, overhead or 0.0)
        v.actions = {k: {"measured": statistics.fmean(d), "median": statistics.median(d),
                         "predicted": want[k],
                         "count": len(d)} for k, d in sorted(actions.items()) if k in want}
        v.replayed = simulate(s, measured_costs(c.costs, actions, v.between)).makespan
        v.replay_ratio = _ratio(v.measured, v.replayed)
    fresh = [p for r in per_rank for p in r.get("profiled", [])]
    if fresh and c.costs is not None:
        # the median: one profile caught by a hiccup does not move it
        mid = {key: statistics.median(p[key] for p in fresh) for key in ("f", "b", "w")}
        fbs = [p["fb"] for p in fresh if p["fb"] is not None]
        fb = statistics.median(fbs) if len(fbs) == len(fresh) else None
        # per stage; a profile at another micro-batch scaled linearly, as the plan did
        per = c.layers_per_stage * c.micro_batch / profile.get("micro_batch", c.micro_batch)
        v.profiled = {"median": mid, "each": fresh, "blocks": profile.get("blocks", 1),
                      "micro_batch": profile.get("micro_batch", c.micro_batch)}
        v.reprofiled = simulate(s, charged_costs(
            mid["f"] * per, mid["b"] * per, mid["w"] * per, None if fb is None else fb * per,
            overhead or 0.0, c.costs.latency)).makespan
        v.reprofile_ratio = _ratio(v.measured, v.reprofiled)
        # the same profile, seconds apart: how steady this machine is
        fs = [p["f"] + p["b"] for p in fresh]
        v.profile_spread = max(fs) / min(fs) if min(fs) > 0 else None
        if v.profile_spread is not None and v.profile_spread > 1 + STEADY:
            said.append(f"the block's profile (F + B) varied {v.profile_spread:.2f}x between "
                        f"the {len(fresh)} profiles taken with this run: this machine's speed "
                        f"is not steady enough to check a prediction to {STEADY:.0%}")
            v.note = "; ".join(said)
    return v


def breakdown(v: Verification) -> str:
    """Where a verification's error comes from, in one line: each action kind's measured
    median against its predicted cost, and the schedule replayed with the measured costs
    (``measured / replayed`` near 1: the profile was off, not the model)."""
    parts = [f"{k} {d['measured'] * 1e3:.2f}/{d['predicted'] * 1e3:.2f} ms"
             for k, d in v.actions.items()]
    text = "actions measured/predicted: " + ", ".join(parts)
    if v.between is not None:
        text += f"; between actions {v.between * 1e3:.2f} ms measured"
        if v.overhead is not None:
            text += f" (overhead per action {v.overhead * 1e3:.2f} ms predicted)"
    if v.replayed:
        text += (f"; replayed with the measured action times: {v.replayed * 1e3:.1f} ms "
                 f"(measured/replayed {v.replay_ratio:.3f})")
    if v.reprofiled:
        each = v.profiled["each"]
        text += (f"; re-profiled with the run ({len(each)} profiles, F "
                 f"{min(p['f'] for p in each) * 1e3:.3f}-{max(p['f'] for p in each) * 1e3:.3f} "
                 f"ms per block): predicted {v.reprofiled * 1e3:.1f} ms (measured/re-profiled "
                 f"{v.reprofile_ratio:.3f})")
    return text


def sync_line(v: Verification) -> str:
    """A verification's gradient synchronisation in one line: measured against
    predicted, its parts (inside the all-reduces, DualPipe's exchange) against theirs,
    this host's fitted figures, and the whole step with it."""
    def vs(measured: float, predicted: float | None, ratio: float | None) -> str:
        return (f"{measured * 1e3:.3f} ms" + ("" if predicted is None else
                f" (predicted {predicted * 1e3:.3f} ms" + ("" if ratio is None else
                f", measured/predicted {ratio:.3f}") + ")"))

    def link(name: str, d: dict) -> str:
        bw = "infinite" if math.isinf(d["bandwidth"]) else f"{d['bandwidth'] / 1e6:.0f} MB/s"
        return (f"{name} {d['latency'] * 1e6:.1f} us, {bw} (fitted at "
                f"{format_bytes(d['sizes'][0])} and {format_bytes(d['sizes'][1])})")
    what = (["DualPipe's exchange"] if v.in_exchange is not None else []) + (
        [f"the all-reduce over DP={v.replicas} replicas"] if v.replicas > 1 else [])
    text = (f"gradient synchronisation after step() ({' + '.join(what)}): "
            + vs(v.sync_measured, v.sync_predicted, v.sync_ratio))
    parts = []
    if v.in_all_reduce is not None:
        parts.append("inside the all-reduces " + vs(v.in_all_reduce, v.all_reduce_predicted,
                                                    v.all_reduce_ratio))
    if v.in_exchange is not None:
        parts.append("in the exchange " + vs(v.in_exchange, v.exchange_predicted,
                                             v.exchange_ratio))
    if parts:
        text += "; of it " + ", ".join(parts) + (
            ", the rest packing the gradients" if v.in_all_reduce is not None else "")
    links = ([link("this host's all-reduce: per hop", v.all_reduce)] if v.all_reduce else []) \
        + ([link("swap with the partner rank:", v.p2p)] if v.p2p else [])
    if links:
        text += "; " + "; ".join(links)
    if v.with_sync_predicted is not None:
        text += (f"; step() + synchronisation {v.with_sync_measured * 1e3:.3f} ms measured, "
                 f"{v.with_sync_predicted * 1e3:.3f} ms predicted" + (
                     "" if v.with_sync_ratio is None else
                     f" (measured/predicted {v.with_sync_ratio:.3f})"))
    return text


def verify_table(vs: list[Verification], notes: list[str]) -> str:
    again = any(v.reprofiled for v in vs)
    rows = [("verified", "candidate", "status", "predicted ms", "measured ms",
             "measured/predicted") + (("re-profiled ms", "measured/re-profiled") if again
                                      else ())]
    for v in vs:
        rows.append((v.role, v.candidate.label(), v.candidate.status, f"{v.predicted * 1e3:.3f}",
                     f"{v.measured * 1e3:.3f}", "-" if v.ratio is None else f"{v.ratio:.3f}")
                    + ((("-", "-") if not v.reprofiled else (
                        f"{v.reprofiled * 1e3:.3f}", f"{v.reprofile_ratio:.3f}")) if again
                       else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x.rjust(w) if i >= 3 else x.ljust(w)
                       for i, (x, w) in enumerate(zip(r, widths))) for r in rows]
    lines += [f"  note: {v.role}: {v.note}" for v in vs if v.note]
    lines += [f"  {v.role}: {breakdown(v)}" for v in vs if v.actions]
    lines += [f"  {v.role}: {sync_line(v)}" for v in vs if v.sync_measured is not None]
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

HELP = """\
Recommend a schedule, pipeline size P, data-parallel size DP = D / P and micro-batch count
N for a model of --layers identical blocks on --devices devices, from the cost of one
block: measured (--stage module:function) or given (--costs file.json).

Modelled: every registered schedule priced by the simulator; a stage of k = L / S blocks
costs k blocks plus the runtime's overhead per action; with --stage the block is profiled
at every micro-batch size priced (--no-each-micro-batch: scale the example's costs
linearly, as a --costs file always is) and the transfer latency, bandwidth and runtime
overhead are measured on 2 local gloo ranks (--no-measure-runtime: not measured;
--latency/--bandwidth/--overhead override); memory per device = peak live activations of
the worst rank + parameters of the stage modules it holds x --param-factor.

Not modelled: the optimizer step; the gradient synchronisation (the DP all-reduce and
DualPipe's copy exchange) only with --grad-sync-bandwidth (the replicas' network: this
host cannot measure it), added after the pipeline, not overlapped.

--verify (with --stage): run the recommendation and one runner-up (another schedule or P)
through the runtime on this host, P local CPU ranks per replica and the candidate's DP
replicas when P x DP ranks fit --verify-max-ranks (--no-verify-dp: one replica), and
print measured / predicted step time, and where the error comes from (each action kind
against its profile, the run replayed by the simulator, and the prediction again with
the block re-profiled by the ranks around the run: --no-verify-reprofile skips that);
the gradient synchronisation after each step (the all-reduce over the replicas,
DualPipe's exchange) is timed and checked against the model at this host's all-reduce
latency and bandwidth, measured in the run.

--comm-sms FILE --comm-bytes BYTES: the block moves BYTES per forward + backward (e.g. its
MoE dispatch + combine) and FILE is bench.overlap_gpu's overlap_gpu.json measured on the
GPU you plan for: each candidate is priced at each communication SM budget measured there
and keeps its best (column "comm SMs"); --comm-bandwidth caps the measured (one-GPU)
bandwidth at your network's.  Not in this version: --verify on CUDA blocks.

Cost file: {"f": s, "b": s, "w": s, "fb": s|null, "act_bytes": int, "param_bytes": int,
"boundary_bytes": int, "micro_batch": int, "latency": s, "bandwidth": bytes/s|null,
"overhead": s} (fb, latency, bandwidth and overhead optional: no overlap, 0, infinite,
0).  See docs/performance.md, "Planning a run".
"""


def _size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:  # argparse would only say "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def _profile_blocks_arg(text: str) -> int | str:
    """``--profile-blocks``: a block count >= 1, or ``rank`` (each candidate's own)."""
    if text == "rank":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(
            f"want a number of blocks >= 1 or 'rank', got {text!r}")
    return k


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--costs", metavar="FILE", help="cost model of one block (JSON)")
    src.add_argument("--stage", metavar="MODULE:FUNCTION",
                     help="measure one block: FUNCTION() returns (block, example_micro_batch, "
                          "criterion_or_None)")
    p.add_argument("--devices", type=int, required=True, help="devices in all (D)")
    p.add_argument("--layers", type=int, required=True, help="blocks in the model (L)")
    p.add_argument("--global-batch", type=int, required=True, help="samples per step (G)")
    p.add_argument("--memory-cap", type=_size_arg, default=None, metavar="BYTES",
                   help="memory per device, e.g. 80GB or 8GiB (default: no cap)")
    p.add_argument("--schedules", nargs="+", default=None, metavar="NAME",
                   help=f"schedules to consider (default: all registered: "
                        f"{' '.join(REGISTRY)})")
    p.add_argument("--min-micro-batch", type=int, default=1, metavar="SAMPLES",
                   help="reject smaller micro-batches (the linear model prices them too "
                        "low; default 1)")
    p.add_argument("--param-factor", type=float, default=4.0,
                   help="bytes held per parameter byte: weights + gradients + optimizer "
                        "state (default 4)")
    p.add_argument("--latency", type=float, default=None,
                   help="seconds per transfer (default: measured with --stage, else the "
                        "cost file's, or 0)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="bytes/s between ranks (default: measured with --stage, else the "
                        "cost file's, or infinite)")
    p.add_argument("--overhead", type=float, default=None,
                   help="the runtime's seconds per action (default: measured with --stage, "
                        "else the cost file's, or 0)")
    p.add_argument("--measure-runtime", action=argparse.BooleanOptionalAction, default=None,
                   help="measure transfer latency, bandwidth and the runtime's overhead per "
                        "action on 2 local gloo ranks (default: on with --stage, off with "
                        "--costs); --latency/--bandwidth/--overhead override what it measures")
    p.add_argument("--each-micro-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="with --stage: profile the block at every micro-batch size the plan "
                        "prices instead of scaling the example's costs linearly (default: on)")
    p.add_argument("--grad-sync-bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                   help="model the gradient synchronisation after each step: ring "
                        "all-reduce over the DP replicas at this bandwidth (default: not "
                        "modelled)")
    p.add_argument("--grad-sync-latency", type=float, default=0.0, metavar="S",
                   help="seconds per all-reduce hop with --grad-sync-bandwidth (default 0)")
    p.add_argument("--comm-sms", metavar="FILE", default=None,
                   help="bench.overlap_gpu's overlap_gpu.json from the target GPU: price each "
                        "candidate at each communication SM budget measured there (needs "
                        "--comm-bytes)")
    p.add_argument("--comm-bytes", type=_size_arg, default=None, metavar="BYTES",
                   help="with --comm-sms: bytes one block moves per forward + backward at "
                        "the cost model's micro-batch (e.g. MoE dispatch + combine), half in "
                        "each")
    p.add_argument("--comm-bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                   help="with --comm-sms: cap the measured communication bandwidth at your "
                        "network's per-GPU all-to-all bandwidth (the measurement runs on one "
                        "GPU; default: not capped)")
    p.add_argument("--comm-kernels", metavar="PARTITION/COMPUTE/COMM", default=None,
                   help="with --comm-sms: which measured kernels to use (default: "
                        "software/cublas/nccl_a2a when present)")
    p.add_argument("--profile-blocks", type=_profile_blocks_arg, default=1, metavar="K|rank",
                   help="with --stage: time a stage of K fresh blocks and divide by K (a "
                        "stage streams its blocks' weights; one block timed again and again "
                        "stays in cache); at most the smallest stage you plan (default 1). "
                        "'rank': profile again for each candidate, as a stage of as many "
                        "blocks as one of its ranks holds (slower: once per micro-batch size "
                        "and block count)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats with --stage")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first with --stage")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while measuring with --stage (default: torch's; "
                        "on a loaded machine more threads than free cores inflate the times)")
    p.add_argument("--save-costs", metavar="FILE", default=None,
                   help="write the cost model used (measured or given) as a --costs file")
    p.add_argument("--top", type=int, default=None,
                   help="show only the best TOP priced candidates in the table")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-o", "--draw", metavar="FILE", default=None,
                   help="draw the recommendation's simulated timeline (.json trace; .png "
                        "needs matplotlib, the [draw] extra)")
    p.add_argument("--verify", action="store_true",
                   help="with --stage: run the recommendation and a runner-up through the "
                        "runtime here (P local CPU ranks per replica, DP replicas: "
                        "--verify-dp) and report measured / predicted step time and "
                        "gradient synchronisation")
    p.add_argument("--verify-steps", type=int, default=5, metavar="STEPS",
                   help="measured steps per verified candidate (median; default 5)")
    p.add_argument("--verify-warmup", type=int, default=2, metavar="STEPS",
                   help="untimed steps first (default 2)")
    p.add_argument("--verify-max-ranks", type=int, default=4, metavar="P",
                   help="skip candidates on more pipeline ranks (default 4); a "
                        "candidate's data-parallel replicas run when P x DP ranks fit")
    p.add_argument("--verify-dp", action=argparse.BooleanOptionalAction, default=True,
                   help="with --verify: run a candidate's DP replicas too (P x DP local "
                        "ranks, when at most --verify-max-ranks; else one replica, said in "
                        "a note) and check the gradient synchronisation after each step "
                        "(the all-reduce at this host's measured figures; default: on)")
    p.add_argument("--verify-reprofile", action=argparse.BooleanOptionalAction, default=True,
                   help="with --verify: every rank profiles the block again at the "
                        "candidate's micro-batch right before and after its run, and the "
                        "prediction is repeated with that profile (the planner's error "
                        "without the machine's drift since the plan; default: on)")


def check_arguments(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """What argparse cannot say by itself (``parser.error``: exit 2 with the usage)."""
    if a.comm_sms is not None and a.verify:
        parser.error("--verify runs the candidates on this host's CPU ranks, with no SM split "
                     "and no MoE communication, while --comm-sms prices a GPU run: use one "
                     "or the other")
    if a.verify and a.stage is None:
        parser.error("--verify runs the candidates through the runtime, which needs a stage "
                     "factory to build the stages: pass --stage module:function (a --costs "
                     "file has only the costs)")
    for name in ("verify_steps", "verify_max_ranks"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.verify_warmup < 0:
        parser.error(f"--verify-warmup must be >= 0, got {a.verify_warmup}")
    if (a.comm_sms is None) != (a.comm_bytes is None):
        parser.error("--comm-sms FILE and --comm-bytes BYTES go together: the measured SM "
                     "budgets and the bytes one block moves per forward + backward")
    if (a.comm_kernels is not None or a.comm_bandwidth is not None) and a.comm_sms is None:
        parser.error("--comm-kernels and --comm-bandwidth refine a --comm-sms FILE: pass that "
                     "file too")
    for name in ("latency", "overhead"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            parser.error(f"--{name} must be a finite number of seconds >= 0, got {v}")
    if a.bandwidth is not None and not a.bandwidth > 0:
        parser.error(f"--bandwidth must be > 0 bytes/s, got {a.bandwidth}")


def run(a: argparse.Namespace) -> int:
    """The ``plan`` command: exit 0 with a recommendation, 1 when nothing fits (the
    message says which limit to relax); bad input raises ``ValueError`` (exit 2)."""
    say = (lambda *x: print(*x, file=sys.stderr)) if a.json else print
    measure = a.costs is None if a.measure_runtime is None else a.measure_runtime
    prof, costs_at = None, None
    comm = None
    if a.comm_sms is not None:  # a bad file is said before any profiling
        comm = load_comm_budget(a.comm_sms, a.comm_bytes, 1, a.comm_kernels, a.comm_bandwidth)
    if a.costs is not None:
        block = BlockCosts.load(a.costs)
        threads, source = (1 if a.threads is None else a.threads), f"from {a.costs}"
    else:
        if a.threads is not None:
            if a.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {a.threads}")
            import torch
            torch.set_num_threads(a.threads)
        per_rank = a.profile_blocks == "rank"
        base_blocks = 1 if per_rank else a.profile_blocks
        prof = profile_stage(a.stage, repeats=a.repeats, warmup=a.warmup,
                             blocks=base_blocks)
        block, threads, source = prof.costs, prof.threads, None
    if measure:
        rt = measure_runtime(boundary_bytes=block.boundary_bytes, threads=threads)
        say(rt.describe())
        block = block.with_transport(rt.latency, rt.bandwidth, rt.overhead)
        source = "measured on 2 local gloo ranks"
    if (a.latency, a.bandwidth, a.overhead) != (None, None, None):
        block = block.with_transport(a.latency, a.bandwidth, a.overhead)
        source = (source + "; " if source else "") + "--latency/--bandwidth/--overhead"
    if prof is not None:
        prof.costs, prof.transport = block, source
        say(prof.describe())
        if a.each_micro_batch or per_rank:
            profiled: dict[tuple[int, int], BlockCosts] = {
                (block.micro_batch, base_blocks): block}

            def costs_at(m: int, blocks: int | None = None) -> BlockCosts:
                # without --each-micro-batch: at the example's size, scaled linearly
                key = (m if a.each_micro_batch else block.micro_batch,
                       blocks if per_rank else base_blocks)
                if key not in profiled:
                    c = profile_stage(a.stage, repeats=a.repeats, warmup=a.warmup,
                                      micro_batch=key[0], blocks=key[1]).costs
                    profiled[key] = c = c.with_transport(block.latency, block.bandwidth,
                                                         block.overhead)
                    say(f"measured at a micro-batch of {key[0]}"
                        + (f", a stage of {key[1]} blocks" if per_rank else "")
                        + f": F {c.f * 1e3:.3f} ms, B {c.b * 1e3:.3f} ms, W "
                        f"{c.w * 1e3:.3f} ms per block, saved {format_bytes(c.act_bytes)}, "
                        f"output {format_bytes(c.boundary_bytes)}")
                return profiled[key]
    if a.save_costs:
        with open(a.save_costs, "w") as fh:
            json.dump(block.to_json(), fh, indent=1)
        say(f"wrote the cost model to {a.save_costs}")
    if comm is not None:  # the volume refers to the cost model's micro-batch
        comm = replace(comm, micro_batch=block.micro_batch)
        say(comm.describe())
    p = plan(block, a.devices, a.layers, a.global_batch, memory_cap=a.memory_cap,
             schedules=a.schedules, param_factor=a.param_factor,
             min_micro_batch=a.min_micro_batch, costs_at=costs_at,
             rank_blocks=prof is not None and a.profile_blocks == "rank",
             grad_sync=None if a.grad_sync_bandwidth is None else GradSync(
                 a.grad_sync_bandwidth, a.grad_sync_latency), comm=comm)
    rec = p.recommendation
    if not a.json:
        print(f"{len(p.candidates)} candidates for {p.devices} devices, {p.layers} layers, "
              f"global batch {p.global_batch}, memory cap {format_bytes(p.memory_cap)}:")
        print(p.table(a.top))
        if rec is not None:
            print(f"recommendation: {rec.label()} (micro-batch {rec.micro_batch} samples, "
                  f"{rec.layers_per_stage} layers per stage): step {rec.step_time * 1e3:.3f} ms "
                  f"simulated, bubble {rec.bubble_fraction:.1%}, "
                  f"{format_bytes(rec.memory)} per device"
                  + ("" if rec.comm_sms is None else
                     f", communication SM budget {budget_label(rec.comm_sms)} ({comm.kernels})")
                  + (" (the gradient synchronisation is not modelled: --grad-sync-bandwidth)"
                     if p.grad_sync is None else
                     f" (the step includes {rec.grad_sync_time * 1e3:.3f} ms of gradient "
                     "synchronisation)"))
    verified: list[Verification] = []
    notes: list[str] = []
    if a.verify and rec is not None:
        if prof.device != "cpu":
            raise ValueError(f"--verify runs the ranks on this host's CPU (gloo); the stage "
                             f"factory's example is on {prof.device}")
        picked, notes = verify_candidates(p, a.verify_max_ranks)
        for role, c in picked:
            replicas = c.dp if a.verify_dp and c.ranks * c.dp <= a.verify_max_ranks else 1
            why = "" if replicas == c.dp else (
                " (one replica: --no-verify-dp)" if not a.verify_dp else
                f" (one replica: P x DP = {c.ranks * c.dp} ranks is more than "
                f"--verify-max-ranks {a.verify_max_ranks})")
            say(f"verifying {role} {c.label()}: {c.ranks * replicas} local rank(s)"
                f"{why}, {prof.threads} torch thread(s) each, {a.verify_warmup} + "
                f"{a.verify_steps} steps ...")
            again = None
            if a.verify_reprofile:  # as the plan profiled this candidate's block
                again = {"repeats": a.repeats, "warmup": a.warmup, "blocks": (
                    c.layers_per_stage * get_schedule(c.schedule, c.ranks, c.chunks)
                    .stages_per_rank if a.profile_blocks == "rank" else a.profile_blocks)}
                if not a.each_micro_batch:  # at the example's size, scaled linearly
                    again["micro_batch"] = p.block.micro_batch
            verified.append(verify(c, a.stage, role, steps=a.verify_steps,
                                   warmup=a.verify_warmup, threads=prof.threads,
                                   overhead=p.block.overhead, profile=again,
                                   replicas=replicas, block=p.block))
        say(verify_table(verified, notes))
    if a.json:
        d = p.to_json()
        if a.verify:
            d["verify"] = {"candidates": [v.to_json() for v in verified], "notes": notes,
                           "steps": a.verify_steps, "warmup": a.verify_warmup}
        print(json.dumps(d))
    if rec is None:
        print(f"error: nothing feasible: {p.why_none()}", file=sys.stderr)
        return 1
    if a.draw:
        from .draw import draw
        res = p.simulate(rec)
        draw(a.draw, res.intervals, res.schedule, title=f"plan: {rec.label()}",
             time_unit="s")
        say(f"wrote {a.draw}")
    return 0
