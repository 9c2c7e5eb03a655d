"""Interleave the sub-stages of a forward chunk and a backward chunk (DualPipe's F&B).

A stage is declared as an ordered list of **sub-stages**, each ``compute`` or ``comm``
(a DeepSeek-V3 MoE layer: attention → dispatch all-to-all → experts → combine
all-to-all).  A ``comm`` sub-stage is asynchronous: its forward *starts* the
communication and returns a :class:`CommHandle`; whoever needs the result waits on the
handle later.  Its backward is a communication too (the all-to-all of the gradients),
declared by the user, also returning a handle.  A ``compute`` sub-stage is an ordinary
differentiable function; its backward is autograd's, run **per sub-stage** on the
sub-stage's own saved inputs and outputs, optionally with its weight-gradient part
deferred to a separate ``W`` step.

Subclass :class:`SubStageModule`, implement :meth:`SubStageModule.substages`, and the class
gets a ``forward`` (the sub-stages in order) and a classmethod
``overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1,
outputs1, output_grads1) -> (outputs0, loss0)`` with the published DualPipe contract:
``module0`` runs a forward on ``inputs0`` (plus ``criterion0(*outputs0, *labels0)`` on the
last stage), ``module1`` runs the full backward of an earlier forward (from ``loss1``, or
from ``outputs1`` with ``output_grads1``), leaving the input gradients in ``.grad`` of
``module1``'s inputs.  The two are interleaved so that while one side's communication
is in flight the other side computes, in DeepSeek's order (for the MoE layer)::

    B:combine  F:attn  B:mlp  F:dispatch  B:dispatch  W:mlp  F:mlp  B:attn  W:attn  F:combine

(:func:`build_order` derives this order for any sub-stage lists, or takes an explicit one).

How the backward can run per sub-stage
--------------------------------------
When grad is enabled, the forward cuts the autograd graph at every sub-stage boundary
(each sub-stage sees detached inputs that require grad when the originals did) and ties
the pieces together with one autograd node on the module's outputs.  A plain
``loss.backward()`` reaches that node, which runs the sub-stage backwards one after
another (so a :class:`SubStageModule` trains like any module, with the same numbers),
while :func:`overlapped_forward_backward` finds the node from ``loss1``/``outputs1`` and
drives the same per-sub-stage steps itself, interleaved with the forward.  Both execute
the same kernels in the same order inside each sub-stage, so the loss is bitwise equal to
an uncut module's and the gradients are equal too (bitwise unless a parameter is shared
between sub-stages and already had a gradient, where the addition order differs).

Limits: ``retain_graph``/double backward through a :class:`SubStageModule` are not
supported (a second backward raises); sub-stages must not modify their inputs in place;
``torch.autograd.grad`` through the module computes input gradients correctly but also
accumulates parameter gradients into ``.grad`` (like reentrant checkpointing).

Streams (CUDA): compute sub-stages run on ``StreamPair.compute``, communication is
launched on ``StreamPair.comm`` after it waits for the compute stream; inputs of a
communication are handed to the comm stream and its outputs to the compute stream
(``record_stream``).  On the CPU the same code runs with the no-op twin; a gloo
``async_op=True`` collective or :func:`run_async` runs the communication in another
thread, so it really overlaps the host's compute.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, ClassVar, Sequence, Union

import torch
import torch.nn as nn

from .streams import StreamEvent, StreamPair
from .timeline import Timeline

__all__ = [
    "COMPUTE", "COMM", "SUBSTAGE_COMPUTE_LANE", "SUBSTAGE_COMM_LANE", "FB_WINDOW_LANE",
    "CommHandle", "run_async", "SubStage", "compute", "comm", "Step", "build_order",
    "SubStageModule", "run_substages", "overlapped_forward_backward",
    "plain_forward_backward", "defer_weight_grad",
]

log = logging.getLogger(__name__)

COMPUTE = "compute"
COMM = "comm"
#: Timeline lanes the sub-stages are recorded on (separate from the runtime's
#: ``"compute"``/``"comm"`` action lanes, so a whole F&B action does not count as compute).
SUBSTAGE_COMPUTE_LANE = "sub.compute"
SUBSTAGE_COMM_LANE = "sub.comm"
#: One span per overlapped pair (label ``"F&B"``): the windows for per-pair metrics.
FB_WINDOW_LANE = "sub.fb"

Tensors = tuple[torch.Tensor, ...]


# ---------------------------------------------------------------------------------------
# Asynchronous communication handles
# ---------------------------------------------------------------------------------------
def _as_tensors(value: Any, what: str, allow_none: bool = False) -> Tensors:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(
            isinstance(v, torch.Tensor) or (allow_none and v is None) for v in value):
        return tuple(value)
    raise TypeError(f"{what} must be a tensor or a tuple/list of tensors"
                    f"{' (None allowed)' if allow_none else ''}, got "
                    f"{type(value).__name__}" + (
                        f" containing {sorted({type(v).__name__ for v in value})}"
                        if isinstance(value, (tuple, list)) else ""))


class CommHandle:
    """A communication in flight; :meth:`wait` returns its result tensors.

    ``stream_ordered=True`` means :meth:`wait` only makes the *current CUDA stream* wait
    (NCCL work on CUDA tensors, a kernel followed by an event): it never blocks the host,
    so the F&B driver calls it right after the launch, on the communication stream.
    Otherwise :meth:`wait` blocks the host until the data is there (gloo, thread pools)
    and is called only when the result is needed.  ``on_done(callback)``, if given,
    registers a no-argument callback run when the communication completes (used to time
    it on the host clock).

    Build one with :meth:`from_work`, :meth:`from_future`, :meth:`from_event`,
    :meth:`ready`, or :func:`run_async`.
    """

    __slots__ = ("_wait", "_result", "stream_ordered", "_on_done")

    def __init__(self, wait: Callable[[], Any], *, stream_ordered: bool = False,
                 on_done: Callable[[Callable[[], None]], None] | None = None) -> None:
        if not callable(wait):
            raise TypeError(f"CommHandle needs a callable wait, got {type(wait).__name__}")
        self._wait = wait
        self._result: Tensors | None = None
        self.stream_ordered = bool(stream_ordered)
        self._on_done = on_done

    def wait(self) -> Tensors:
        """The result tensors (waits once; later calls return the same tuple)."""
        if self._result is None:
            # None entries: a backward communication's "no gradient for this input"
            self._result = _as_tensors(self._wait(), "the result of a communication",
                                       allow_none=True)
            self._wait = None  # drop references held by the closure
        return self._result

    def add_done_callback(self, fn: Callable[[], None]) -> bool:
        """Run ``fn()`` when the communication completes; ``False`` if this handle cannot
        tell (then the caller times it at :meth:`wait`)."""
        if self._on_done is None:
            return False
        try:
            self._on_done(fn)
        except Exception as e:  # noqa: BLE001 - timing is best effort
            log.debug("cannot register a completion callback: %s", e)
            return False
        return True

    @classmethod
    def ready(cls, outputs: torch.Tensor | Sequence[torch.Tensor]) -> "CommHandle":
        """A communication that has already finished (e.g. a single-rank no-op)."""
        outs = _as_tensors(outputs, "outputs")
        return cls(lambda: outs, on_done=lambda fn: fn())

    @classmethod
    def from_work(cls, work: Any, outputs: torch.Tensor | Sequence[torch.Tensor]) -> "CommHandle":
        """Wrap the ``Work`` returned by a ``torch.distributed`` call with ``async_op=True``
        whose results land in ``outputs`` (e.g. the output buffer of
        ``all_to_all_single``).  Stream-ordered when the outputs are CUDA tensors (NCCL)."""
        if not hasattr(work, "wait"):
            raise TypeError(f"from_work() takes the Work returned by a torch.distributed call "
                            f"with async_op=True, got {type(work).__name__}")
        outs = _as_tensors(outputs, "outputs")

        def wait() -> Tensors:
            work.wait()
            return outs

        def on_done(fn: Callable[[], None]) -> None:
            work.get_future().add_done_callback(lambda _f: fn())

        return cls(wait, stream_ordered=any(t.is_cuda for t in outs), on_done=on_done)

    @classmethod
    def from_future(cls, future: Any) -> "CommHandle":
        """Wrap a ``concurrent.futures.Future`` or ``torch.futures.Future`` whose result is
        a tensor or a tuple of tensors (host-ordered: :meth:`wait` blocks)."""
        if hasattr(future, "result") and hasattr(future, "add_done_callback"):
            wait = future.result
        elif hasattr(future, "wait") and hasattr(future, "add_done_callback"):
            wait = future.wait
        else:
            raise TypeError(f"from_future() takes a concurrent.futures.Future or a "
                            f"torch.futures.Future, got {type(future).__name__}")
        return cls(wait, on_done=lambda fn: future.add_done_callback(lambda _f: fn()))

    @classmethod
    def from_event(cls, event: StreamEvent,
                   outputs: torch.Tensor | Sequence[torch.Tensor]) -> "CommHandle":
        """A communication made of kernels already queued on a stream, followed by
        ``event`` (DeepEP style): waiting makes the current stream wait for the event."""
        if not isinstance(event, StreamEvent):
            raise TypeError(f"from_event() takes a StreamEvent, got {type(event).__name__}")
        outs = _as_tensors(outputs, "outputs")

        def wait() -> Tensors:
            event.current_stream_wait()
            return outs

        return cls(wait, stream_ordered=event.event is not None)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def run_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CommHandle:
    """Run ``fn(*args, **kwargs)`` (returning a tensor or tuple of tensors) on a shared
    background thread pool and return its handle: a single-process stand-in for a
    communication (tests, CPU emulation).  The pool (4 threads) is created on first use."""
    global _pool
    if not callable(fn):
        raise TypeError(f"run_async() takes a callable, got {type(fn).__name__}")
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="overlap-comm")
    return CommHandle.from_future(_pool.submit(fn, *args, **kwargs))


# ---------------------------------------------------------------------------------------
# Sub-stage declarations and the interleaving order
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubStage:
    """One piece of a stage's forward.

    ``kind="compute"``: ``fn(*xs)`` returns a tensor or a tuple of tensors, computed on
    the compute stream with autograd; ``split_weight_grad=True`` runs its
    weight-gradient closures (see :func:`defer_weight_grad`) in a separate ``W`` step.
    ``recompute=True`` is activation checkpointing of the sub-stage: the forward keeps
    only its inputs (``torch.utils.checkpoint``, non-reentrant: RNG and autocast state
    are restored) and the sub-stage's own ``B`` step runs it again before its backward,
    so in an overlapped pair the recompute takes the ``B`` step's place in the
    interleaving and hides the other side's communication like any compute step.

    ``kind="comm"``: ``fn(*xs)`` *starts* a communication and returns a
    :class:`CommHandle` for its outputs; ``backward(*grads)`` receives one gradient per
    output (zeros where none flowed, so every rank launches its collective) and returns
    a handle for one gradient per input (``None`` allowed for inputs that need none).
    ``backward=None`` declares a non-differentiable communication.

    ``xs`` are the outputs of the previous sub-stage (the module's inputs for the first);
    tensors only, passed positionally, so a residual must be passed along explicitly.
    """

    name: str
    kind: str
    fn: Callable[..., Any]
    backward: Callable[..., CommHandle] | None = None
    split_weight_grad: bool = False
    recompute: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"sub-stage name must be a non-empty string without ':', "
                             f"got {self.name!r}")
        if self.kind not in (COMPUTE, COMM):
            raise ValueError(f"sub-stage {self.name!r}: kind must be 'compute' or 'comm', "
                             f"got {self.kind!r}")
        if not callable(self.fn):
            raise TypeError(f"sub-stage {self.name!r}: fn must be callable")
        if self.kind == COMPUTE and self.backward is not None:
            raise ValueError(f"compute sub-stage {self.name!r}: its backward is autograd's; "
                             "pass backward only for 'comm' sub-stages")
        if self.kind == COMM and self.backward is not None and not callable(self.backward):
            raise TypeError(f"comm sub-stage {self.name!r}: backward must be callable or None")
        if self.kind == COMM and self.split_weight_grad:
            raise ValueError(f"comm sub-stage {self.name!r} has no weight gradient to split")
        if self.kind == COMM and self.recompute:
            raise ValueError(f"comm sub-stage {self.name!r}: only compute sub-stages can be "
                             "recomputed (a communication's result is kept)")


def compute(name: str, fn: Callable[..., Any], *, split_weight_grad: bool = False,
            recompute: bool = False) -> SubStage:
    """A compute sub-stage (see :class:`SubStage`); ``recompute=True`` checkpoints it."""
    return SubStage(name, COMPUTE, fn, None, split_weight_grad, bool(recompute))


def comm(name: str, start: Callable[..., CommHandle],
         backward: Callable[..., CommHandle] | None) -> SubStage:
    """A communication sub-stage: ``start(*xs) -> CommHandle`` and
    ``backward(*grads) -> CommHandle`` (see :class:`SubStage`)."""
    return SubStage(name, COMM, start, backward, False)


@dataclass(frozen=True)
class Step:
    """One step of an overlapped pair: ``side`` ``"F"`` (forward of sub-stage ``index``
    of ``module0``), ``"B"`` (its input-gradient backward in ``module1``) or ``"W"`` (the
    deferred weight gradient of a ``split_weight_grad`` sub-stage).  Text form
    ``"B:combine"``."""

    side: str
    index: int
    name: str
    kind: str

    def __str__(self) -> str:
        return f"{self.side}:{self.name}"

    __repr__ = __str__


Signature = tuple[tuple[str, str, bool], ...]
OrderSpec = Union[str, Sequence[Union[str, Step]]]
POLICIES = ("alternate", "sequential")


def _signature(stages: Sequence[SubStage]) -> Signature:
    return tuple((s.name, s.kind, s.split_weight_grad) for s in stages)


@lru_cache(maxsize=256)
def _order_cached(fsig: Signature, bsig: Signature, policy: str) -> tuple[Step, ...]:
    fs = [Step("F", i, n, k) for i, (n, k, _) in enumerate(fsig)]
    bs = [Step("B", j, bsig[j][0], bsig[j][1]) for j in reversed(range(len(bsig)))]

    def w(st: Step) -> Step | None:
        return Step("W", st.index, st.name, COMPUTE) if bsig[st.index][2] else None

    out: list[Step] = []
    if policy == "sequential":
        out.extend(fs)
        for st in bs:
            out.append(st)
            if (ws := w(st)) is not None:
                out.append(ws)
        return tuple(out)
    # "alternate": B first, then one F, one B, ...; a deferred W fills the shadow of the
    # next backward communication, or runs at once when the backward has nothing left.
    pending: list[Step] = []
    fi = bi = 0
    turn_b = True
    while fi < len(fs) or bi < len(bs):
        if turn_b and bi < len(bs):
            st = bs[bi]
            bi += 1
            out.append(st)
            if st.kind == COMM:
                out.extend(pending)
                pending = []
            elif (ws := w(st)) is not None:
                pending.append(ws)
            if bi == len(bs):
                out.extend(pending)
                pending = []
        elif not turn_b and fi < len(fs):
            out.append(fs[fi])
            fi += 1
        turn_b = not turn_b
    return tuple(out)


def build_order(forward: Sequence[SubStage], backward: Sequence[SubStage],
                order: OrderSpec = "alternate") -> tuple[Step, ...]:
    """The steps of one overlapped pair.

    ``forward``: ``module0``'s sub-stages; ``backward``: ``module1``'s (either may be
    empty).  ``order``:

    * ``"alternate"`` (default): start with the backward, then alternate one forward and
      one backward step; a ``W`` step is deferred until right after the next backward
      communication launch (so it fills that communication's shadow), or runs at once
      when the backward has no step left.  For attention → dispatch → mlp → combine this
      is exactly DeepSeek's order.
    * ``"sequential"``: the whole forward, then the whole backward (each ``W`` right after
      its ``B``): no overlap, the baseline to measure against.
    * an explicit sequence of steps or their text (``["B:combine", "F:attn", ...]``),
      checked: every step exactly once, forward steps in forward order, backward steps in
      reverse order, each ``W`` after its ``B``.

    Raises ``ValueError`` naming what is missing, repeated or out of order.
    """
    fsig, bsig = _signature(forward), _signature(backward)
    if isinstance(order, str):
        if order not in POLICIES:
            raise ValueError(f"unknown order policy {order!r}: use one of {POLICIES} or an "
                             "explicit list of steps such as ['B:combine', 'F:attn', ...]")
        return _order_cached(fsig, bsig, order)
    return _check_explicit(order, fsig, bsig)


def _check_explicit(order: Sequence[str | Step], fsig: Signature,
                    bsig: Signature) -> tuple[Step, ...]:
    fidx = {n: i for i, (n, _, _) in enumerate(fsig)}
    bidx = {n: i for i, (n, _, _) in enumerate(bsig)}
    expected = set(_order_cached(fsig, bsig, "sequential"))
    steps: list[Step] = []
    for item in order:
        text = str(item)
        side, _, name = text.partition(":")
        table = fidx if side == "F" else bidx if side in ("B", "W") else None
        if table is None or name not in table:
            raise ValueError(f"order step {text!r} is not a step of this pair: use 'F:<name>' "
                             f"for {list(fidx)}, 'B:<name>' for {list(bidx)} and 'W:<name>' "
                             "for backward sub-stages with split_weight_grad=True")
        i = table[name]
        sig = fsig if side == "F" else bsig
        st = Step(side, i, name, COMPUTE if side == "W" else sig[i][1])
        if st not in expected:
            raise ValueError(f"order step {text!r}: sub-stage {name!r} has no separate weight "
                             "gradient (declare it with split_weight_grad=True)")
        steps.append(st)
    seen: set[Step] = set()
    dup = [str(s) for s in steps if s in seen or seen.add(s)]  # type: ignore[func-returns-value]
    missing = [str(s) for s in _order_cached(fsig, bsig, "sequential") if s not in seen]
    if dup or missing:
        raise ValueError(f"order must name every step exactly once: repeated {dup}, "
                         f"missing {missing}")
    f_order = [s.index for s in steps if s.side == "F"]
    b_order = [s.index for s in steps if s.side == "B"]
    if f_order != sorted(f_order):
        raise ValueError(f"forward steps must follow the forward order {[n for n, _, _ in fsig]}, "
                         f"got {[str(s) for s in steps if s.side == 'F']}")
    if b_order != sorted(b_order, reverse=True):
        raise ValueError("backward steps must follow the reverse order "
                         f"{[n for n, _, _ in reversed(bsig)]}, got "
                         f"{[str(s) for s in steps if s.side == 'B']}")
    done_b: set[int] = set()
    for s in steps:
        if s.side == "B":
            done_b.add(s.index)
        elif s.side == "W" and s.index not in done_b:
            raise ValueError(f"order step 'W:{s.name}' comes before 'B:{s.name}': a weight "
                             "gradient needs its backward first")
    return tuple(steps)


# ---------------------------------------------------------------------------------------
# Deferred weight gradients
# ---------------------------------------------------------------------------------------
_wg_bucket: list[Callable[[], None]] | None = None  # process-wide: autograd runs CUDA
# backward functions on its own threads, so a thread-local would not be seen there.


def _weight_grad_store() -> Any:
    """dualpipe's WeightGradStore when that module is loaded (no import dependency)."""
    mod = sys.modules.get("dualpipe.weight_grad")
    store = getattr(mod, "WeightGradStore", None) if mod is not None else None
    if store is None or not all(hasattr(store, a) for a in ("enabled", "put", "take")):
        return None
    return store


def defer_weight_grad(fn: Callable[[], None]) -> None:
    """Call from a custom autograd ``backward`` with a closure computing a weight gradient.

    Inside the input-gradient step of a ``split_weight_grad`` sub-stage the closure is
    kept and run at that sub-stage's ``W`` step; when dualpipe's ``WeightGradStore`` is
    enabled (a zero-bubble ``I`` action) it goes there; otherwise it runs now.
    """
    if _wg_bucket is not None:
        _wg_bucket.append(fn)
        return
    store = _weight_grad_store()
    if store is not None and store.enabled:
        store.put(fn)
        return
    fn()


class _CollectWeightGrads:
    """Collect deferred weight-gradient closures (ours and WeightGradStore's)."""

    __slots__ = ("bucket", "prev", "store", "store_prev")

    def __enter__(self) -> list[Callable[[], None]]:
        global _wg_bucket
        self.bucket: list[Callable[[], None]] = []
        self.prev = _wg_bucket
        _wg_bucket = self.bucket
        self.store = _weight_grad_store()
        if self.store is not None:
            self.store_prev = (self.store.enabled, self.store.take())
            self.store.enabled = True
        return self.bucket

    def __exit__(self, *exc: Any) -> None:
        global _wg_bucket
        _wg_bucket = self.prev
        if self.store is not None:
            self.bucket.extend(self.store.take())
            enabled, cache = self.store_prev
            for f in cache:
                self.store.put(f)
            self.store.enabled = enabled


# ---------------------------------------------------------------------------------------
# Autograd plumbing
# ---------------------------------------------------------------------------------------
try:  # torch >= 2.3 routes through this (keeps contextvars visible in device threads)
    from torch.autograd.graph import _engine_run_backward as _engine
except ImportError:  # pragma: no cover - older torch
    _engine = torch.autograd.Variable._execution_engine.run_backward  # type: ignore[attr-defined]


def _run_engine(roots: Sequence[Any], grads: Sequence[torch.Tensor]) -> None:
    """Backward from ``roots`` (tensors or gradient edges) with ``grads``, accumulating into
    leaves.  Calls the engine directly: no shape check against a root whose ``.data`` a
    pipeline runtime may have released (the engine checks against the graph instead)."""
    _engine(tuple(roots), tuple(grads), False, False, (),
            allow_unreachable=True, accumulate_grad=True)


_edge_roots: bool | None = None


def _edge_roots_ok() -> bool:
    """Whether the engine takes ``GradientEdge`` roots, so a sub-stage's outputs need not be
    kept alive (only their graph) until its backward.  Probed once, on first use."""
    global _edge_roots
    if _edge_roots is None:
        try:
            from torch.autograd.graph import get_gradient_edge
            with torch.enable_grad():
                x = torch.zeros(1, requires_grad=True)
                _run_engine([get_gradient_edge(x * 2)], [torch.ones(1)])
            _edge_roots = bool(x.grad is not None and float(x.grad[0]) == 2.0)
        except Exception as e:  # noqa: BLE001 - feature probe
            log.debug("GradientEdge roots unsupported (%s): keeping sub-stage outputs alive", e)
            _edge_roots = False
    return _edge_roots


def _root(t: torch.Tensor) -> Any:
    if _edge_roots_ok():
        from torch.autograd.graph import get_gradient_edge
        return get_gradient_edge(t)
    return t


def _cut(xs: Tensors, needs: Sequence[bool]) -> Tensors:
    """Detached copies (sharing storage) that require grad where ``needs`` says."""
    out = []
    for t, need in zip(xs, needs):
        leaf = t.detach()
        if need:
            leaf.requires_grad_(True)
        out.append(leaf)
    return tuple(out)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class _Segment:
    """What one sub-stage's backward needs: for compute, its leaf inputs that require grad
    (``None`` elsewhere) and the graph roots of its outputs that require grad; for comm, which
    inputs need a gradient and the outputs' shapes (to send zeros where none flowed)."""

    __slots__ = ("index", "stage", "ins", "roots", "in_needs", "out_meta", "wgrads")

    def __init__(self, index: int, stage: SubStage) -> None:
        self.index = index
        self.stage = stage
        self.ins: tuple[torch.Tensor | None, ...] = ()
        self.roots: tuple[Any, ...] = ()
        self.in_needs: tuple[bool, ...] = ()
        self.out_meta: tuple[tuple[torch.Size, torch.dtype, torch.device], ...] = ()
        self.wgrads: list[Callable[[], None]] | None = None

    def release(self) -> None:
        self.ins = ()
        self.roots = ()


class _Graph:
    """The cut graph of one forward of a :class:`SubStageModule`.

    ``state``: ``live`` (backward not started), ``claimed`` (an overlapped pair waits for
    the output gradients from ``loss1.backward()``), ``stashed`` (they arrived), ``running``,
    ``done``."""

    __slots__ = ("owner", "stages", "segments", "inputs", "in_mask", "out_needs",
                 "state", "stash", "__weakref__")

    def __init__(self, owner: nn.Module, stages: Sequence[SubStage], segments: list[_Segment],
                 inputs: Tensors, out_needs: tuple[bool, ...]) -> None:
        self.owner = weakref.ref(owner)
        self.stages = tuple(stages)
        self.segments = segments
        self.in_mask = tuple(t.requires_grad for t in inputs)
        self.inputs = tuple(t for t in inputs if t.requires_grad)
        self.out_needs = out_needs
        self.state = "live"
        self.stash: tuple[torch.Tensor | None, ...] | None = None

    def inputs_are_leaves(self) -> bool:
        return all(t.grad_fn is None for t in self.inputs)


class _Stitch(torch.autograd.Function):
    """Ties a cut graph to the module's outputs: its backward runs the sub-stage backwards
    (plain use), or hands the output gradients to an overlapped pair that claimed it."""

    @staticmethod
    def forward(ctx: Any, graph: _Graph, finals: Tensors, *inputs: torch.Tensor) -> Tensors:
        ctx.graph = graph
        ctx.n_inputs = len(inputs)
        ctx.set_materialize_grads(False)
        outs = tuple(f.detach() for f in finals)
        fixed = [o for o, need in zip(outs, graph.out_needs) if not need]
        if fixed:
            ctx.mark_non_differentiable(*fixed)
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        g: _Graph = ctx.graph
        none = (None, None)
        if g.state == "claimed":
            g.stash = grads
            g.state = "stashed"
            return none + (None,) * ctx.n_inputs
        if g.state != "live":
            raise RuntimeError(
                "backward through a SubStageModule's forward a second time: its sub-stage "
                "graphs were freed by the first backward (retain_graph is not supported "
                "through SubStageModule; run the forward again)")
        g.state = "running"
        run = _BackwardRun(g, grads, pair=None, tl=Timeline.current(), collect=False)
        for i in reversed(range(len(g.segments))):
            run.step_b(i)
        in_grads = run.input_grads()
        if g.inputs:
            return none + in_grads
        return none + (None,) * ctx.n_inputs  # only the dummy input: nothing upstream


# ---------------------------------------------------------------------------------------
# Forward and backward programs (the same code runs plain and interleaved)
# ---------------------------------------------------------------------------------------
class _Pending:
    """A launched communication and how to collect its result."""

    __slots__ = ("handle", "done", "rec", "tl", "outs")

    def __init__(self, handle: CommHandle, done: StreamEvent | None, rec: Any,
                 tl: Timeline | None, outs: Tensors | None) -> None:
        self.handle = handle
        self.done = done
        self.rec = rec
        self.tl = tl
        self.outs = outs

    def resolve(self, pair: StreamPair | None) -> Tensors:
        if self.outs is not None:  # stream-ordered: already waited on the comm stream
            if pair is not None:
                pair.wait(self.done, "compute")
                pair.handoff(self.outs, to="compute")
            return self.outs
        outs = self.handle.wait()
        if self.tl is not None:
            self.tl.end(self.rec)
        if pair is not None and pair.is_cuda:
            pair.handoff(outs, to="compute")
        return outs


def _launch(start: Callable[..., Any], args: Tensors, label: str, pair: StreamPair | None,
            tl: Timeline | None, after: StreamEvent | None) -> _Pending:
    """Start a communication: on the comm stream when ``pair`` is given, after ``after``
    (the event recorded when its inputs were produced; ``None``: after all work issued
    so far on the current stream)."""
    if pair is None:
        rec = tl.begin(SUBSTAGE_COMM_LANE, label) if tl is not None else None
        handle = _check_handle(start(*args), label)
        if rec is not None and tl.clock == "host":
            handle.add_done_callback(lambda: tl.end_at(rec, time.perf_counter()))
        return _Pending(handle, None, rec, tl, None)
    # waiting for the producer's event only (not the whole compute stream) lets e.g.
    # dispatch(F) start while mlp(B), issued after attn(F), still runs
    with pair.on("comm", wait_for="current" if after is None else after):
        pair.handoff(args, to="comm")
        stream = pair.comm if pair.is_cuda else None
        rec = tl.begin(SUBSTAGE_COMM_LANE, label, stream) if tl is not None else None
        handle = _check_handle(start(*args), label)
        if pair.is_cuda and handle.stream_ordered:
            outs = handle.wait()  # the comm stream waits; the host does not
            done = pair.record("comm")
            if tl is not None:
                tl.end(rec, pair.comm)
            return _Pending(handle, done, None, None, outs)
    if tl is not None and rec is not None and tl.clock == "host":
        handle.add_done_callback(lambda: tl.end_at(rec, time.perf_counter()))
    return _Pending(handle, None, rec, tl, None)


def _mark(pair: StreamPair | None) -> StreamEvent | None:
    """An event after the work issued so far on the compute stream (CUDA pairs only)."""
    return pair.record("compute") if pair is not None and pair.is_cuda else None


def _check_handle(h: Any, label: str) -> CommHandle:
    if not isinstance(h, CommHandle):
        raise TypeError(f"communication sub-stage step {label!r} must return a CommHandle "
                        f"(CommHandle.from_work(work, out), run_async(fn, ...), "
                        f"CommHandle.ready(out)), got {type(h).__name__}")
    return h


def _span(tl: Timeline | None, label: str):
    return tl.span(SUBSTAGE_COMPUTE_LANE, label) if tl is not None else _NO_CM


class _NoCM:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_CM = _NoCM()


class _ForwardRun:
    """Runs a module's sub-stages one step at a time; with grad enabled, cuts the graph at
    each boundary and records what the per-sub-stage backward needs."""

    def __init__(self, module: nn.Module, stages: Sequence[SubStage], inputs: Tensors,
                 pair: StreamPair | None, tl: Timeline | None) -> None:
        self.module = module
        self.stages = stages
        self.inputs = inputs
        self.pair = pair
        self.tl = tl
        self.grad = torch.is_grad_enabled()
        self.xs: Tensors = inputs
        self.needs = tuple(self.grad and t.requires_grad for t in inputs)
        self.segments: list[_Segment] = []
        self.pending: _Pending | None = None
        self.ready: StreamEvent | None = None  # when the current xs were produced (CUDA)
        self.next = 0

    def _resolve(self) -> None:
        p = self.pending
        if p is None:
            return
        self.pending = None
        self.ready = None
        outs = p.resolve(self.pair)
        if any(t is None for t in outs):
            raise TypeError(f"the forward of comm sub-stage {self.segments[-1].stage.name!r} "
                            "returned None in its result: a forward communication must return "
                            "tensors only (None is allowed in a backward's gradients)")
        if self.grad:  # a communication's result starts a new graph piece
            outs = tuple(t.detach() for t in outs)
        seg = self.segments[-1]
        seg.out_meta = tuple((t.shape, t.dtype, t.device) for t in outs)
        flows = self.grad and any(seg.in_needs) and seg.stage.backward is not None
        self.xs = outs
        self.needs = tuple(flows and _differentiable(t) for t in outs)

    def step(self, i: int) -> None:
        if i != self.next:
            raise RuntimeError(f"internal: forward step {i} out of order (expected {self.next})")
        self.next += 1
        self._resolve()
        st = self.stages[i]
        label = f"F:{st.name}"
        seg = _Segment(i, st)
        if st.kind == COMPUTE:
            ins = _cut(self.xs, self.needs) if self.grad else self.xs
            with _span(self.tl, label):
                if self.grad and st.recompute:
                    from torch.utils.checkpoint import checkpoint
                    out = checkpoint(st.fn, *ins, use_reentrant=False)
                else:
                    out = st.fn(*ins)
                outs = _as_tensors(out, f"the output of compute sub-stage {st.name!r}")
            if self.grad:
                seg.ins = tuple(t if t.requires_grad else None for t in ins)
                seg.roots = tuple(_root(o) if o.requires_grad else None for o in outs)
                self.segments.append(seg)
            self.xs = outs
            self.needs = tuple(self.grad and o.requires_grad for o in outs)
            self.ready = _mark(self.pair)
        else:
            seg.in_needs = self.needs
            self.segments.append(seg)
            self.pending = _launch(st.fn, self.xs, label, self.pair, self.tl, self.ready)

    def finish(self) -> Tensors:
        """Collect the last communication and return the module's outputs (tied to the
        cut graph when anything needs a gradient)."""
        if self.next != len(self.stages):
            raise RuntimeError(f"internal: forward finished after {self.next} of "
                               f"{len(self.stages)} sub-stages")
        self._resolve()
        finals = self.xs
        if not (self.grad and any(self.needs)):
            return finals
        graph = _Graph(self.module, self.stages, self.segments, self.inputs, self.needs)
        self.segments = []
        ins = graph.inputs
        if not ins:  # no input requires grad: a dummy so the stitch node exists
            ins = (torch.empty(0, requires_grad=True),)
        return _Stitch.apply(graph, finals, *ins)


class _BackwardRun:
    """Runs the per-sub-stage backward of a cut graph, one step at a time (last sub-stage
    first); ``collect=True`` defers the weight gradients of ``split_weight_grad``
    sub-stages to their ``W`` step."""

    def __init__(self, graph: _Graph, grads: Sequence[torch.Tensor | None],
                 pair: StreamPair | None, tl: Timeline | None, collect: bool) -> None:
        if len(grads) != len(graph.out_needs):
            raise RuntimeError(f"internal: {len(grads)} output gradients for "
                               f"{len(graph.out_needs)} outputs")
        self.g = graph
        self.stages = graph.stages
        self.pair = pair
        self.tl = tl
        self.collect = collect
        self.grads: tuple[torch.Tensor | None, ...] = tuple(grads)
        self.pending: _Pending | None = None
        self.pending_seg: _Segment | None = None
        self.ready: StreamEvent | None = None
        self.next = len(graph.segments) - 1

    def _resolve(self) -> None:
        p = self.pending
        if p is None:
            return
        self.pending = None
        self.ready = None
        seg = self.pending_seg
        got = p.resolve(self.pair)
        if len(got) != len(seg.in_needs):
            raise ValueError(f"the backward of comm sub-stage {seg.stage.name!r} returned "
                             f"{len(got)} gradient(s) but the sub-stage has {len(seg.in_needs)} "
                             "input(s): return one per input, in order")
        self.grads = tuple(g if need else None for g, need in zip(got, seg.in_needs))

    def step_b(self, index: int) -> None:
        if index != self.next:
            raise RuntimeError(f"internal: backward step {index} out of order "
                               f"(expected {self.next})")
        self.next -= 1
        self._resolve()
        seg = self.g.segments[index]
        st = seg.stage
        label = f"B:{st.name}"
        if st.kind == COMPUTE:
            pairs = [(r, g) for r, g in zip(seg.roots, self.grads)
                     if r is not None and g is not None]
            with _span(self.tl, label):
                if pairs and self.collect and st.split_weight_grad:
                    with _CollectWeightGrads() as bucket:
                        _run_engine([p[0] for p in pairs], [p[1] for p in pairs])
                    seg.wgrads = bucket
                elif pairs:
                    _run_engine([p[0] for p in pairs], [p[1] for p in pairs])
            self.grads = tuple(None if leaf is None else leaf.grad for leaf in seg.ins)
            seg.release()
            self.ready = _mark(self.pair)
            return
        if st.backward is None:
            if any(g is not None for g in self.grads):
                raise RuntimeError(f"comm sub-stage {st.name!r} was declared without a backward "
                                   "but its outputs received gradients: pass backward= to comm()")
            self.grads = (None,) * len(seg.in_needs)
            return
        if not any(seg.in_needs):
            self.grads = (None,) * len(seg.in_needs)
            return
        if len(self.grads) != len(seg.out_meta):
            raise RuntimeError(f"internal: {len(self.grads)} gradients for "
                               f"{len(seg.out_meta)} outputs of {st.name!r}")
        gs = tuple(g if g is not None else torch.zeros(shape, dtype=dt, device=dev)
                   for g, (shape, dt, dev) in zip(self.grads, seg.out_meta))
        self.grads = ()
        self.pending_seg = seg
        self.pending = _launch(st.backward, gs, label, self.pair, self.tl, self.ready)

    def step_w(self, index: int) -> None:
        seg = self.g.segments[index]
        fns = seg.wgrads
        if not fns:
            return
        seg.wgrads = None
        with _span(self.tl, f"W:{seg.stage.name}"):
            for fn in fns:
                fn()

    def input_grads(self) -> tuple[torch.Tensor | None, ...]:
        """Finish: collect the last communication, run weight gradients no ``W`` step ran,
        and return the gradients of the graph's inputs that require grad (in order)."""
        if self.next != -1:
            raise RuntimeError(f"internal: backward finished with {self.next + 1} "
                               "sub-stage(s) left")
        self._resolve()
        for seg in self.g.segments:
            if seg.wgrads:
                self.step_w(seg.index)
        g = self.g
        g.state = "done"
        g.segments = []
        if len(self.grads) != len(g.in_mask):
            raise RuntimeError(f"internal: {len(self.grads)} input gradients for "
                               f"{len(g.in_mask)} inputs")
        return tuple(x for x, keep in zip(self.grads, g.in_mask) if keep)

    def deliver(self) -> None:
        """Finish and accumulate the input gradients into the inputs' ``.grad`` (what the
        pipeline runtime reads), continuing upstream when an input is not a leaf."""
        grads = self.input_grads()
        pairs = [(t, x) for t, x in zip(self.g.inputs, grads) if x is not None]
        if pairs:
            _run_engine([p[0] for p in pairs], [p[1] for p in pairs])


# ---------------------------------------------------------------------------------------
# Modules and the overlapped pair
# ---------------------------------------------------------------------------------------
def _stages_of(module: nn.Module) -> tuple[SubStage, ...]:
    stages = module.substages()
    if isinstance(stages, SubStage) or not isinstance(stages, (list, tuple)):
        raise TypeError(f"{type(module).__name__}.substages() must return a list of SubStage "
                        f"(built with overlap.fb.compute/comm), got {type(stages).__name__}")
    if not stages:
        raise ValueError(f"{type(module).__name__}.substages() returned no sub-stage")
    names = set()
    for s in stages:
        if not isinstance(s, SubStage):
            raise TypeError(f"{type(module).__name__}.substages() must contain only SubStage "
                            f"objects, got {type(s).__name__}")
        if s.name in names:
            raise ValueError(f"{type(module).__name__}.substages(): the name {s.name!r} is used "
                             "twice; sub-stage names must be unique within a module")
        names.add(s.name)
    return tuple(stages)


def _tensors_in(inputs: Any, what: str) -> Tensors:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{what} must be a tuple or list of tensors, got {type(inputs).__name__}")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}; sub-stages pass tensors only")
    return tuple(inputs)


def _config(module: nn.Module) -> dict:
    return getattr(module, "_overlap_config", None) or {}


def _pick_timeline(timeline: Timeline | None, module: nn.Module) -> Timeline | None:
    if timeline is not None:
        return timeline
    tl = _config(module).get("timeline")
    return tl if tl is not None else Timeline.current()


def run_substages(module: nn.Module, inputs: Sequence[torch.Tensor], *,
                  timeline: Timeline | None = None) -> Tensors:
    """Run ``module.substages()`` in order on ``inputs`` (what
    :meth:`SubStageModule.forward` does): on the current stream, each communication
    waited for before the next sub-stage.  Returns the outputs as a tuple, tied to the
    per-sub-stage graph when grad is enabled and anything requires grad."""
    stages = _stages_of(module)
    tl = _pick_timeline(timeline, module)
    run = _ForwardRun(module, stages, _tensors_in(inputs, "inputs"), None, tl)
    for i in range(len(stages)):
        run.step(i)
    return run.finish()


class SubStageModule(nn.Module):
    """Base class of a stage made of sub-stages.

    Implement :meth:`substages`; the class then has a ``forward`` and an
    ``overlapped_forward_backward`` classmethod (the DualPipe contract) that interleaves
    the forward of one module with the backward of another.  ``overlap_order`` (class
    attribute) or :meth:`configure_overlap` choose the order (see :func:`build_order`).

    Example (a toy MoE layer; ``a2a`` starts an all-to-all and returns a CommHandle)::

        class Layer(SubStageModule):
            def substages(self):
                return [compute("attn", self.attn),
                        comm("dispatch", a2a, a2a),
                        compute("mlp", self.mlp),
                        comm("combine", a2a, a2a)]
    """

    overlap_order: ClassVar[OrderSpec] = "alternate"

    def substages(self) -> Sequence[SubStage]:
        """The sub-stages of this module's forward, in order."""
        raise NotImplementedError(f"{type(self).__name__} must implement substages() returning "
                                  "a list of overlap.fb.compute(...)/comm(...) sub-stages")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | Tensors:
        """The sub-stages in order; one output tensor is returned as is, several as a tuple."""
        outs = run_substages(self, inputs)
        return outs[0] if len(outs) == 1 else outs

    def configure_overlap(self, *, streams: StreamPair | None = None,
                          timeline: Timeline | None = None,
                          order: OrderSpec | None = None) -> "SubStageModule":
        """Per-module settings for overlapped pairs where this is ``module0``: the
        :class:`StreamPair` (default: the device's shared pair), a :class:`Timeline` to
        record sub-stage spans into (default: :meth:`Timeline.current`), and the order
        (default: ``overlap_order``).  Returns ``self``."""
        if streams is not None and not isinstance(streams, StreamPair):
            raise TypeError(f"streams must be a StreamPair, got {type(streams).__name__}")
        if timeline is not None and not isinstance(timeline, Timeline):
            raise TypeError(f"timeline must be a Timeline, got {type(timeline).__name__}")
        self._overlap_config = {"streams": streams, "timeline": timeline, "order": order}
        return self

    @classmethod
    def overlapped_forward_backward(
        cls,
        module0: nn.Module,
        inputs0: Sequence[torch.Tensor],
        criterion0: Callable[..., torch.Tensor] | None,
        labels0: Sequence[torch.Tensor] | None,
        module1: nn.Module,
        loss1: torch.Tensor | None,
        outputs1: Sequence[torch.Tensor] | None,
        output_grads1: Sequence[torch.Tensor | None] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The DualPipe F&B contract (see :func:`overlapped_forward_backward`)."""
        return overlapped_forward_backward(module0, inputs0, criterion0, labels0,
                                           module1, loss1, outputs1, output_grads1)


def _plain_backward(loss1: torch.Tensor | None, outputs1: Sequence[torch.Tensor] | None,
                    output_grads1: Sequence[torch.Tensor | None] | None) -> None:
    if loss1 is not None:
        loss1.backward()
        return
    if not outputs1:
        return
    pairs = [(o, g) for o, g in zip(outputs1, output_grads1 or ())
             if o.requires_grad and g is not None]
    if pairs:
        _run_engine([p[0] for p in pairs], [p[1] for p in pairs])


def _graph_of_outputs(module1: nn.Module, outputs1: Sequence[torch.Tensor],
                      output_grads1: Sequence[torch.Tensor | None]) -> tuple[_Graph, list] | None:
    graph = None
    grads: list[torch.Tensor | None] = []
    for o, gr in zip(outputs1, output_grads1):
        if not o.requires_grad or gr is None:
            continue
        node = o.grad_fn
        if not isinstance(node, _Stitch._backward_cls):
            return None
        g = node.graph
        if graph is None:
            graph = g
            grads = [None] * len(g.out_needs)
        elif g is not graph:
            return None
        i = o.output_nr
        grads[i] = gr if grads[i] is None else grads[i] + gr
    if graph is None or graph.owner() is not module1 or graph.state != "live":
        return None
    return graph, grads


def _graph_of_loss(module1: nn.Module, loss1: torch.Tensor, limit: int = 10_000) -> _Graph | None:
    """Find the cut graph of ``module1`` under ``loss1`` (the criterion's graph is small)."""
    root = loss1.grad_fn
    if root is None:
        return None
    found: list[_Graph] = []
    seen = {id(root)}
    todo = [root]
    while todo:
        node = todo.pop()
        if isinstance(node, _Stitch._backward_cls):
            g = node.graph
            if g.owner() is module1 and g.state == "live" and g not in found:
                found.append(g)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                if len(seen) >= limit:
                    log.debug("loss graph larger than %d nodes: not overlapping this "
                              "backward", limit)
                    return None
                seen.add(id(nxt))
                todo.append(nxt)
    return found[0] if len(found) == 1 else None


def _claim_backward(module1: nn.Module, loss1: torch.Tensor | None,
                    outputs1: Sequence[torch.Tensor] | None,
                    output_grads1: Sequence[torch.Tensor | None] | None,
                    pair: StreamPair | None, tl: Timeline | None) -> _BackwardRun | None:
    """Take over module1's backward when it ran through sub-stages; ``None``: do it plainly."""
    if loss1 is not None:
        if not isinstance(loss1, torch.Tensor):
            raise TypeError(f"loss1 must be a tensor or None, got {type(loss1).__name__}")
        graph = _graph_of_loss(module1, loss1)
        if graph is None or not graph.inputs_are_leaves():
            return None
        graph.state = "claimed"
        try:
            loss1.backward()  # the criterion's backward; the stitch node stashes its grads
        except BaseException:
            graph.state = "live"
            raise
        if graph.state != "stashed":  # loss did not reach the module's outputs
            graph.state = "live"
            return _EMPTY
        graph.state = "running"
        grads = graph.stash
        graph.stash = None
        return _BackwardRun(graph, grads, pair, tl, collect=True)
    if not outputs1:
        return _EMPTY
    if output_grads1 is None or len(output_grads1) != len(outputs1):
        raise ValueError(f"output_grads1 must give one gradient (or None) per tensor of "
                         f"outputs1: got {0 if output_grads1 is None else len(output_grads1)} "
                         f"for {len(outputs1)}")
    found = _graph_of_outputs(module1, outputs1, output_grads1)
    if found is None:
        return None
    graph, grads = found
    graph.state = "running"
    return _BackwardRun(graph, grads, pair, tl, collect=True)


_EMPTY: Any = object()  # sentinel: nothing to backpropagate


def _device_of(inputs: Tensors, module: nn.Module) -> torch.device:
    for t in inputs:
        return t.device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def plain_forward_backward(
    module0: nn.Module, inputs0: Sequence[torch.Tensor],
    criterion0: Callable[..., torch.Tensor] | None, labels0: Sequence[torch.Tensor] | None,
    module1: nn.Module, loss1: torch.Tensor | None,
    outputs1: Sequence[torch.Tensor] | None,
    output_grads1: Sequence[torch.Tensor | None] | None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The F&B contract without overlap: ``module0``'s forward, then ``module1``'s backward
    (what the published example does).  The default for modules without sub-stages."""
    ins = _tensors_in(inputs0, "inputs0")
    out = module0(*ins)
    outputs0 = [out] if isinstance(out, torch.Tensor) else list(out)
    loss0 = criterion0(*outputs0, *(labels0 or ())) if criterion0 is not None else None
    _plain_backward(loss1, outputs1, output_grads1)
    return outputs0, loss0


def overlapped_forward_backward(
    module0: nn.Module, inputs0: Sequence[torch.Tensor],
    criterion0: Callable[..., torch.Tensor] | None, labels0: Sequence[torch.Tensor] | None,
    module1: nn.Module, loss1: torch.Tensor | None,
    outputs1: Sequence[torch.Tensor] | None,
    output_grads1: Sequence[torch.Tensor | None] | None,
    *, order: OrderSpec | None = None, streams: StreamPair | None = None,
    timeline: Timeline | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Forward of ``module0`` interleaved with the backward of ``module1``.

    Arguments (DualPipe's contract; ``B`` = micro-batch size, shapes are the stage's):

    * ``inputs0``: tuple/list of tensors, ``module0``'s inputs for this micro-batch;
    * ``criterion0``, ``labels0``: on the last stage, ``loss0 = criterion0(*outputs0,
      *labels0)`` (a scalar tensor); ``None`` and ``[]`` elsewhere;
    * ``loss1``: on the last stage, the loss of ``module1``'s earlier forward, to
      backpropagate; else ``None`` and ``outputs1``/``output_grads1`` give ``module1``'s
      outputs and the gradients received for them (same shapes/dtypes; outputs that need
      no gradient may be left out).

    Returns ``(outputs0, loss0)``: ``outputs0`` a list of tensors, ``loss0`` ``None`` unless
    ``criterion0`` was given.  Afterwards the gradients of ``module1``'s inputs are in
    their ``.grad`` and its parameters' gradients are accumulated.

    When ``module0`` is a :class:`SubStageModule` and ``module1``'s forward ran through its
    sub-stages, the steps of :func:`build_order` (``order``, default the module's
    configured or class order) run on ``streams`` (default the device's shared
    :class:`StreamPair`), recording sub-stage spans into ``timeline`` (default the
    module's, else :meth:`Timeline.current`).  Otherwise it falls back to
    :func:`plain_forward_backward` semantics (logged at debug level).
    """
    if not isinstance(module0, SubStageModule):
        return plain_forward_backward(module0, inputs0, criterion0, labels0,
                                      module1, loss1, outputs1, output_grads1)
    if criterion0 is not None and not callable(criterion0):
        raise TypeError(f"criterion0 must be callable or None, got {type(criterion0).__name__}")
    cfg = _config(module0)
    ins = _tensors_in(inputs0, "inputs0")
    tl = _pick_timeline(timeline, module0)
    pair = streams if streams is not None else cfg.get("streams")
    if pair is None:
        pair = StreamPair.for_device(_device_of(ins, module0))
    if order is None:
        order = cfg.get("order")
    if order is None:
        order = type(module0).overlap_order
    f_stages = _stages_of(module0)
    window = tl.begin(FB_WINDOW_LANE, "F&B") if tl is not None else None
    with pair.on("compute", join=True):
        bwd = _claim_backward(module1, loss1, outputs1, output_grads1, pair, tl)
        fwd = _ForwardRun(module0, f_stages, ins, pair, tl)
        if bwd is None:
            log.debug("%s: module1's backward did not run through sub-stages; running it "
                      "after the forward, without overlap", type(module0).__name__)
        if bwd is None or bwd is _EMPTY:  # nothing to interleave with: forward steps only
            steps = build_order(f_stages, (), "sequential")
        else:
            steps = build_order(f_stages, bwd.stages, order)
        for st in steps:
            if st.side == "F":
                fwd.step(st.index)
            elif st.side == "B":
                bwd.step_b(st.index)
            else:
                bwd.step_w(st.index)
        outputs0 = list(fwd.finish())
        loss0 = criterion0(*outputs0, *(labels0 or ())) if criterion0 is not None else None
        if bwd is None:
            _plain_backward(loss1, outputs1, output_grads1)
        elif bwd is not _EMPTY:
            bwd.deliver()
    if tl is not None:
        tl.end(window)
    return outputs0, loss0
