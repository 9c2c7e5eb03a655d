"""Sub-stage declarations (:class:`SubStage`, :func:`compute`, :func:`comm`) and the
interleaving order of an overlapped pair (:class:`Step`, :func:`build_order`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence, Union

from .handles import CommHandle

COMPUTE = "compute"
COMM = "comm"


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
