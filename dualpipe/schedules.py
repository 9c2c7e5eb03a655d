"""Pipeline schedules as data.

A schedule is a pure function ``(num_ranks, num_chunks) -> Schedule``; a
:class:`Schedule` holds one list of :class:`Action` per rank, in execution order,
plus the placement that says which pipeline stage each of a rank's local modules
("chunks") is.  The runtime, the simulator, the validator and the drawer all read
this one object; no other module knows the order of any schedule.

Vocabulary
----------
stream
    An independent set of micro-batches flowing through its own sequence of stages.
    DualPipe has two streams (one entering at rank 0, one at rank P-1); DualPipeV,
    1F1B and ZB1P have one.
stage
    Position along a stream, ``0 .. num_stages-1``.  Stage 0 receives the inputs, the
    last stage computes the loss.
chunk
    A rank's local module index (0 or 1 for DualPipe/DualPipeV, 0 for 1F1B/ZB1P).
micro-batch
    Index within the stream that the chunk serves, counted from 0.

Compute actions (text form in brackets, ``c`` = chunk, ``i`` = micro-batch)
--------------------------------------------------------------------------
``F`` [``Fc.i``]  forward of chunk ``c`` on micro-batch ``i``.
``B`` [``Bc.i``]  full backward (input and weight gradients together).
``I`` [``Ic.i``]  input-gradient part of the backward; the weight part is deferred.
``W`` [``Wc.i``]  the deferred weight-gradient part of an earlier ``Ic.i``.
``FB`` [``Fc.i+Bd.j``]  an overlapped pair: forward of ``c``/``i`` together with the
      full backward of ``d``/``j`` (what ``overlapped_forward_backward`` runs).

Communication actions, produced by :func:`lower` (``p`` = peer rank)
-------------------------------------------------------------------
``SEND_F`` [``SFc.i>p``] send the output of forward ``c``/``i`` to rank ``p``.
``RECV_F`` [``RFc.i<p``] receive the input of forward ``c``/``i`` from rank ``p``.
``SEND_B`` [``SBc.i>p``] send the input gradient of backward ``c``/``i`` to rank ``p``.
``RECV_B`` [``RBc.i<p``] receive the output gradient for backward ``c``/``i`` from ``p``.

The golden files of the published implementation write a deferred weight pass as a
bare ``W`` (first in, first out); :meth:`Schedule.golden` renders that form.
"""

from __future__ import annotations

import gc
import re
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Iterator, Sequence

__all__ = [
    "F", "B", "I", "W", "FB", "SEND_F", "RECV_F", "SEND_B", "RECV_B",
    "COMPUTE_KINDS", "COMM_KINDS",
    "Action", "Stream", "Schedule", "parse_action",
    "dualpipe", "dualpipev", "one_f_one_b", "zb1p", "fb_only",
    "SCHEDULES", "get_schedule", "lower", "ScheduleSpec", "REGISTRY", "register",
    "unregister", "spec_of", "placement_schedule", "gc_paused",
]

F, B, I, W, FB = "F", "B", "I", "W", "FB"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE_KINDS = frozenset({F, B, I, W, FB})
COMM_KINDS = frozenset({SEND_F, RECV_F, SEND_B, RECV_B})
_COMM_PREFIX = {SEND_F: "SF", RECV_F: "RF", SEND_B: "SB", RECV_B: "RB"}
_COMM_ARROW = {SEND_F: ">", SEND_B: ">", RECV_F: "<", RECV_B: "<"}


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a rank does.

    ``chunk``/``mb`` name the (forward part of the) action; ``chunk2``/``mb2`` the
    backward part of an ``FB`` pair; ``peer`` the other rank of a communication.
    Unused fields are ``-1``.
    """

    kind: str
    chunk: int = -1
    mb: int = -1
    chunk2: int = -1
    mb2: int = -1
    peer: int = -1

    def __str__(self) -> str:
        k = self.kind
        if k == FB:
            return f"F{self.chunk}.{self.mb}+B{self.chunk2}.{self.mb2}"
        if k in _COMM_PREFIX:
            return f"{_COMM_PREFIX[k]}{self.chunk}.{self.mb}{_COMM_ARROW[k]}{self.peer}"
        return f"{k}{self.chunk}.{self.mb}"

    __repr__ = __str__

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    def parts(self) -> tuple[tuple[str, int, int], ...]:
        """The compute parts as ``(kind, chunk, mb)``: two for ``FB``, else one."""
        if self.kind == FB:
            return ((F, self.chunk, self.mb), (B, self.chunk2, self.mb2))
        return ((self.kind, self.chunk, self.mb),)


_TOKEN = re.compile(
    r"^(?:(?P<fb>F(?P<c1>\d+)\.(?P<m1>\d+)\+B(?P<c2>\d+)\.(?P<m2>\d+))"
    r"|(?P<k>[FBIW])(?P<c>\d+)\.(?P<m>\d+)"
    r"|(?P<cp>SF|RF|SB|RB)(?P<cc>\d+)\.(?P<cm>\d+)(?P<arrow>[<>])(?P<peer>\d+))$"
)
_PREFIX_KIND = {v: k for k, v in _COMM_PREFIX.items()}


def parse_action(token: str) -> Action:
    """Parse the text form written by ``str(action)``; raises ``ValueError``."""
    m = _TOKEN.match(token.strip())
    if m is None:
        raise ValueError(
            f"cannot parse action {token!r}: expected e.g. 'F0.3', 'I1.2', 'W0.1', "
            "'F0.3+B1.1', 'SF0.3>2' or 'RB1.0<3'"
        )
    if m["fb"]:
        return Action(FB, int(m["c1"]), int(m["m1"]), int(m["c2"]), int(m["m2"]))
    if m["k"]:
        return Action(m["k"], int(m["c"]), int(m["m"]))
    kind = _PREFIX_KIND[m["cp"]]
    if m["arrow"] != _COMM_ARROW[kind]:
        raise ValueError(f"cannot parse action {token!r}: {m['cp']} takes '{_COMM_ARROW[kind]}'")
    return Action(kind, int(m["cc"]), int(m["cm"]), peer=int(m["peer"]))


@dataclass(frozen=True, slots=True)
class Stream:
    """A set of ``num_microbatches`` micro-batches passing through ``num_stages`` stages.

    ``first_microbatch`` is the global index (into the step's ``num_chunks``
    micro-batches) of this stream's micro-batch 0.
    """

    num_stages: int
    num_microbatches: int
    first_microbatch: int = 0


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists plus the placement of stages on ranks.

    ``placement[r][c] = (stream, stage)`` for chunk ``c`` of rank ``r``.
    ``actions[r]`` is rank ``r``'s compute order (use :func:`lower` for the order
    including communication).  Indexing and iterating a ``Schedule`` goes over
    ``actions``.
    """

    name: str
    num_ranks: int
    num_chunks: int
    streams: tuple[Stream, ...]
    placement: tuple[tuple[tuple[int, int], ...], ...]
    actions: tuple[tuple[Action, ...], ...]

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, rank: int) -> tuple[Action, ...]:
        return self.actions[rank]

    def __iter__(self) -> Iterator[tuple[Action, ...]]:
        return iter(self.actions)

    # Equal schedules have equal names and sizes, so this hash agrees with the generated
    # ``__eq__`` and costs O(1) instead of hashing every action: caches keyed by a
    # schedule (the runtime's plans) stay cheap at 128 ranks x 4096 chunks.
    def __hash__(self) -> int:
        return hash((self.name, self.num_ranks, self.num_chunks))

    # Derived data below is computed once per Schedule object and kept on it (the
    # object is immutable; ``cached_property`` writes to the instance's ``__dict__``,
    # which the frozen dataclass's ``__eq__`` and ``__hash__`` do not look at).

    @cached_property
    def stage_owner(self) -> dict[tuple[int, int], tuple[int, int]]:
        """``(stream, stage) -> (rank, chunk)``."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for r, chunks in enumerate(self.placement):
            for c, key in enumerate(chunks):
                out[key] = (r, c)
        return out

    @cached_property
    def neighbours(self) -> tuple[tuple[tuple[tuple[int, int] | None,
                                             tuple[int, int] | None], ...], ...]:
        """``neighbours[r][c] = (prev, next)``: the ``(rank, chunk)`` holding the
        previous and the next stage of chunk ``c`` of rank ``r`` along its stream,
        ``None`` at a stream's ends."""
        owner = self.stage_owner
        out = []
        for chunks in self.placement:
            row = []
            for stream, stage in chunks:
                prev = owner[(stream, stage - 1)] if stage > 0 else None
                last = stage + 1 == self.streams[stream].num_stages
                row.append((prev, None if last else owner[(stream, stage + 1)]))
            out.append(tuple(row))
        return tuple(out)

    @property
    def stages_per_rank(self) -> int:
        """How many stage modules every rank holds (2 for DualPipe/DualPipeV)."""
        return len(self.placement[0])

    @cached_property
    def num_stages(self) -> int:
        """Distinct stages of the model (DualPipe's two streams run the same stages):
        ``PP`` as the published tables use it."""
        return len({stage for chunks in self.placement for _st, stage in chunks})

    @cached_property
    def primary(self) -> tuple[tuple[bool, ...], ...]:
        """``primary[r][c]``: chunk ``c`` of rank ``r`` is the copy of its stage that is
        counted once (the copy on the lowest stream; False for DualPipe's second copy of
        a stage that another rank also holds)."""
        first: dict[int, int] = {}
        for chunks in self.placement:
            for stream, stage in chunks:
                first[stage] = min(stream, first.get(stage, stream))
        return tuple(tuple(stream == first[stage] for stream, stage in chunks)
                     for chunks in self.placement)

    @property
    def duplicated_stages(self) -> bool:
        """Some stage lives on two (rank, chunk)s whose gradients must be added."""
        return not all(all(row) for row in self.primary)

    @cached_property
    def lowered(self) -> tuple[tuple[Action, ...], ...]:
        """:func:`lower` of this schedule (computed on first use)."""
        return _lower(self)

    def input_chunk(self, rank: int) -> int | None:
        """The chunk of ``rank`` that is a stream's first stage (it takes ``step()``'s
        inputs), or ``None``."""
        return self._end_chunk(rank, last=False)

    def loss_chunk(self, rank: int) -> int | None:
        """The chunk of ``rank`` that is a stream's last stage (it takes the labels and
        computes the losses), or ``None``."""
        return self._end_chunk(rank, last=True)

    def input_microbatches(self, rank: int) -> range | None:
        """Step-wide indices of the micro-batches whose inputs ``rank`` passes to
        ``step()`` (a contiguous slice of the batch), or ``None``."""
        return self._stream_range(rank, self.input_chunk(rank))

    def loss_microbatches(self, rank: int) -> range | None:
        """Step-wide indices of the micro-batches whose labels ``rank`` passes and whose
        losses/outputs it gets back, or ``None``."""
        return self._stream_range(rank, self.loss_chunk(rank))

    def _end_chunk(self, rank: int, last: bool) -> int | None:
        found = [c for c, (st, stage) in enumerate(self.placement[rank])
                 if stage == (self.streams[st].num_stages - 1 if last else 0)]
        if len(found) > 1:
            raise ValueError(f"rank {rank} holds {len(found)} {'last' if last else 'first'} "
                             "stages; the runtime supports at most one per rank")
        return found[0] if found else None

    def _stream_range(self, rank: int, chunk: int | None) -> range | None:
        if chunk is None:
            return None
        st = self.streams[self.placement[rank][chunk][0]]
        return range(st.first_microbatch, st.first_microbatch + st.num_microbatches)

    def tokens(self) -> list[list[str]]:
        """The text form, one token per action, per rank."""
        return [[str(a) for a in acts] for acts in self.actions]

    def golden(self) -> list[list[str]]:
        """The form of the published golden files: a deferred W is a bare ``W``."""
        return [["W" if a.kind == W else str(a) for a in acts] for acts in self.actions]

    def render(self) -> str:
        """A rank x step grid for logs and error messages."""
        return render_grid(self.tokens())


def render_grid(tokens: Sequence[Sequence[str]], mark: tuple[int, int] | None = None) -> str:
    """Render per-rank token lists as a grid; ``mark=(rank, index)`` brackets one cell."""
    width = max((len(t) for row in tokens for t in row), default=1) + 2
    lines = []
    for r, row in enumerate(tokens):
        cells = []
        for i, t in enumerate(row):
            cells.append((f"[{t}]" if mark == (r, i) else f" {t} ").ljust(width))
        lines.append(f"rank {r:>2}: " + "".join(cells).rstrip())
    return "\n".join(lines)


@contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector inside a pass that builds many objects.

    The generators, :func:`lower`, the validator and the simulator allocate a few
    small objects per action (actions, tuples, intervals) and create no reference
    cycles.  With the collector running, each time the heap grows by a quarter it
    walks every live object and finds nothing to free; on a large schedule that walk
    leaves the caches and its cost per object grows with the heap, which made these
    passes super-linear in practice (``bench.scale``).  Reference counting frees as
    usual; the collector's previous state is restored on exit.  Use as a context
    manager or a decorator (``@gc_paused()``)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- builders


class _RankBuilder:
    """Appends compute actions for one rank, numbering micro-batches per chunk and
    resolving each deferred ``W`` to the oldest pending ``I`` (first in, first out)."""

    __slots__ = ("acts", "nf", "nb", "pending", "chunk_of")

    def __init__(self, chunk_of: Callable[[int], int] = lambda p: p):
        self.acts: list[Action] = []
        self.nf = [0, 0]
        self.nb = [0, 0]
        self.pending: deque[tuple[int, int]] = deque()
        self.chunk_of = chunk_of

    def f(self, phase: int) -> None:
        c = self.chunk_of(phase)
        self.acts.append(Action(F, c, self.nf[c]))
        self.nf[c] += 1

    def b(self, phase: int, defer_w: bool = False) -> None:
        c = self.chunk_of(phase)
        self.acts.append(Action(I if defer_w else B, c, self.nb[c]))
        if defer_w:
            self.pending.append((c, self.nb[c]))
        self.nb[c] += 1

    def w(self) -> None:
        c, m = self.pending.popleft()
        self.acts.append(Action(W, c, m))

    def fb(self, phase_f: int, phase_b: int) -> None:
        cf, cb = self.chunk_of(phase_f), self.chunk_of(phase_b)
        self.acts.append(Action(FB, cf, self.nf[cf], cb, self.nb[cb]))
        self.nf[cf] += 1
        self.nb[cb] += 1


def _dual_rank(R: int, r: int, C: int, flip: bool) -> tuple[Action, ...]:
    """The eight phases of the bidirectional schedule for one rank.

    ``R`` ranks per half-pipe, ``r`` this rank's position in it, ``C`` micro-batches
    per direction.  "Phase" 0 is the chunk whose stage lies further from the
    pipe's turning point; ``flip`` maps phases onto chunks for DualPipe's second
    half of ranks.  The order follows the published DualPipe/DualPipeV step().
    """
    rb = _RankBuilder((lambda p: 1 - p) if flip else (lambda p: p))
    last = r == R - 1
    for _ in range((R - r - 1) * 2):        # 1: forwards of phase 0 only
        rb.f(0)
    for _ in range(r + 1):                  # 2: alternate forwards, both phases
        rb.f(0)
        rb.f(1)
    for _ in range(R - r - 1):              # 3: input-grad, its W at once, forward
        rb.b(1, defer_w=True)
        rb.w()
        rb.f(1)
    for i in range(C - 2 * R + r + 1):      # 4: steady state of overlapped pairs
        if i == 0 and last:
            # The rank at the turning point does not overlap its first pair:
            # its phase-1 forward needs the phase-0 output it has just computed.
            rb.f(0)
            rb.b(1)
        else:
            rb.fb(0, 1)
        rb.fb(1, 0)
    for _ in range(R - r - 1):              # 5: backward, then an overlapped pair
        rb.b(1)
        rb.fb(1, 0)
    defer = False                           # 6: backwards; the second half defers W
    half = (r + 1) // 2
    for i in range(r + 1):
        if i == half and r % 2 == 1:
            defer = True
        rb.b(1, defer)
        if i == half and r % 2 == 0:
            defer = True
        rb.b(0, defer)
    for _ in range(R - r - 1):              # 7: a deferred W, then an input-grad
        rb.w()
        rb.b(0, defer_w=True)
    while rb.pending:                       # 8: the remaining deferred Ws
        rb.w()
    return tuple(rb.acts)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


@gc_paused()
def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipe: ``num_ranks`` (even) ranks, two directions of ``num_chunks // 2``
    micro-batches each.  Chunk 0 of rank ``r`` is stage ``r`` of stream 0 (enters at
    rank 0, micro-batches ``0 .. N/2-1``); chunk 1 is stage ``P-1-r`` of stream 1
    (enters at rank ``P-1``, micro-batches ``N/2 .. N-1``)."""
    P, N = _check_int("num_ranks", num_ranks), _check_int("num_chunks", num_chunks)
    if P < 2 or P % 2:
        raise ValueError(f"DualPipe needs an even number of ranks >= 2, got num_ranks={P}; "
                         "use dualpipev for an odd count")
    if N % 2 or N < 2 * P:
        raise ValueError(f"DualPipe with {P} ranks needs an even num_chunks >= {2 * P} "
                         f"(2 x ranks), got {N}")
    R, C = P // 2, N // 2
    acts = tuple(_dual_rank(R, min(r, P - 1 - r), C, flip=r >= R) for r in range(P))
    placement = tuple(((0, r), (1, P - 1 - r)) for r in range(P))
    streams = (Stream(P, C, 0), Stream(P, C, C))
    return Schedule("dualpipe", P, N, streams, placement, acts)


@gc_paused()
def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipeV: ``num_ranks`` ranks, ``2 * num_ranks`` stages folded into a V; one
    stream of ``num_chunks`` micro-batches entering and leaving at rank 0.  Chunk 0
    of rank ``r`` is stage ``r``, chunk 1 is stage ``2R-1-r``."""
    R, N = _check_int("num_ranks", num_ranks), _check_int("num_chunks", num_chunks)
    if R < 1:
        raise ValueError(f"DualPipeV needs num_ranks >= 1, got {R}")
    if N < 2 * R:
        raise ValueError(f"DualPipeV with {R} ranks needs num_chunks >= {2 * R} "
                         f"(2 x ranks), got {N}")
    acts = tuple(_dual_rank(R, r, N, flip=False) for r in range(R))
    placement = tuple(((0, r), (0, 2 * R - 1 - r)) for r in range(R))
    return Schedule("dualpipev", R, N, (Stream(2 * R, N, 0),), placement, acts)


def _single_checks(name: str, num_ranks: int, num_chunks: int) -> tuple[int, int]:
    P, N = _check_int("num_ranks", num_ranks), _check_int("num_chunks", num_chunks)
    if P < 1:
        raise ValueError(f"{name} needs num_ranks >= 1, got {P}")
    if N < P:
        raise ValueError(f"{name} with {P} ranks needs num_chunks >= {P}, got {N}")
    return P, N


def _single_stage(name: str, P: int, N: int, zero_bubble: bool) -> Schedule:
    """1F1B's order on one stage per rank: ``P-1-r`` warm-up forwards, then one
    forward and one backward alternately, then the remaining backwards.  With
    ``zero_bubble`` each backward is an input-gradient ``I`` and rank ``r`` keeps ``r``
    weight passes pending, running one W after every further ``I`` and the rest at
    the end."""
    acts = []
    for r in range(P):
        rb = _RankBuilder()
        warm = P - 1 - r
        for _ in range(warm):
            rb.f(0)
        for k in range(N):
            if k < N - warm:
                rb.f(0)
            rb.b(0, defer_w=zero_bubble)
            if zero_bubble and len(rb.pending) > r:
                rb.w()
        while rb.pending:
            rb.w()
        acts.append(tuple(rb.acts))
    return Schedule(name, P, N, (Stream(P, N, 0),), tuple(((0, r),) for r in range(P)),
                    tuple(acts))


@gc_paused()
def one_f_one_b(num_ranks: int, num_chunks: int) -> Schedule:
    """1F1B: one stage per rank; ``P-1-r`` warm-up forwards, then alternate one
    forward and one full backward, then the remaining backwards."""
    P, N = _single_checks("1F1B", num_ranks, num_chunks)
    return _single_stage("1f1b", P, N, zero_bubble=False)


@gc_paused()
def zb1p(num_ranks: int, num_chunks: int) -> Schedule:
    """ZB-H1 (zero bubble at 1F1B's activation memory): the 1F1B order with every
    backward split into its input-gradient ``I`` and a deferred ``W``.  Rank ``r``
    keeps ``r`` weight passes pending (the last rank the most): the input gradients
    travel back to rank 0 without waiting for weight passes, and each rank runs one
    W after every further ``I`` and the rest at the end, where 1F1B would idle."""
    P, N = _single_checks("ZB1P", num_ranks, num_chunks)
    return _single_stage("zb1p", P, N, zero_bubble=True)


@gc_paused()
def fb_only(num_ranks: int, num_chunks: int) -> Schedule:
    """Overlapped forward/backward with no pipeline: one rank, one stage (the whole
    model), ``F0, F1+B0, F2+B1, ..., B(N-1)``.  Each pair runs the forward of one
    micro-batch with the backward of the previous one, so a stage that overlaps them
    (``overlapped_forward_backward``, e.g. an expert-parallel MoE layer built with
    ``overlap.fb``) hides one's all-to-alls under the other's compute, as DualPipe's
    steady state does, without pipeline parallelism (Megatron's "combined 1F1B without
    pipelining").  Every rank of an expert-parallel group runs its own such pipeline of
    one rank; the weight gradients are not split (nothing to fill)."""
    P, N = _check_int("num_ranks", num_ranks), _check_int("num_chunks", num_chunks)
    if P != 1:
        raise ValueError(f"fb-only has no pipeline: it runs on 1 rank (give each "
                         f"expert-parallel rank its own pipeline group of one), got "
                         f"num_ranks={P}")
    if N < 1:
        raise ValueError(f"fb-only needs num_chunks >= 1, got {N}")
    acts = [Action(F, 0, 0)]
    acts += [Action(FB, 0, m, 0, m - 1) for m in range(1, N)]
    acts.append(Action(B, 0, N - 1))
    return Schedule("fb-only", 1, N, (Stream(1, N, 0),), (((0, 0),),), (tuple(acts),))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ScheduleSpec:
    """What the tools know about a schedule beyond what its action lists and placement
    say (those facts are :class:`Schedule` properties: ``stages_per_rank``,
    ``num_stages``, ``primary``, ``duplicated_stages``, ``neighbours``, ...).

    ``build(num_ranks, num_chunks) -> Schedule`` is the generator; ``title`` names it in
    drawings and tables; ``min_chunks(num_ranks)`` is the smallest valid chunk count
    (the placement does not depend on the count, so tools that need only the placement
    build that one); ``bubble(PP, costs)`` and ``activations(PP)`` are the published
    formulas (``None`` where nothing is published), in terms of ``PP =
    Schedule.num_stages``; ``legs`` labels the two directions in drawings;
    ``supports(num_ranks)`` says which rank counts it runs on (the generator raises
    ``ValueError`` for the others; sweeps and tests ask this instead).
    """

    name: str
    build: Callable[[int, int], "Schedule"]
    title: str
    min_chunks: Callable[[int], int]
    bubble: Callable[[int, object], float] | None = None
    activations: Callable[[int], int] | None = None
    legs: tuple[str, str] = ("", "")
    supports: Callable[[int], bool] = lambda num_ranks: num_ranks >= 1


REGISTRY: dict[str, ScheduleSpec] = {}


def register(spec: ScheduleSpec) -> ScheduleSpec:
    """Add a schedule: the runtime, simulator, validator, drawer, demo and CLI then
    handle it (a new schedule is this call and its generator, nothing else).  Raises
    ``ValueError`` if the name is taken; :func:`unregister` removes one (tests)."""
    if not isinstance(spec, ScheduleSpec):
        raise TypeError(f"register() takes a ScheduleSpec, got {type(spec).__name__}")
    if spec.name in REGISTRY:
        raise ValueError(f"a schedule named {spec.name!r} is registered already")
    REGISTRY[spec.name] = spec
    SCHEDULES[spec.name] = spec.build
    get_schedule.cache_clear()
    return spec


def unregister(name: str) -> None:
    """Remove a registered schedule (tests that register toys clean up with it)."""
    REGISTRY.pop(name, None)
    SCHEDULES.pop(name, None)
    get_schedule.cache_clear()


def spec_of(name: str) -> ScheduleSpec:
    """The registry entry of ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(REGISTRY)}") from None


#: name -> generator, for every registered schedule (kept in step with REGISTRY)
SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {}


@lru_cache(maxsize=64)
def get_schedule(name: str, num_ranks: int, num_chunks: int) -> Schedule:
    """Look up a generator by name and run it (cached: schedules are immutable)."""
    return spec_of(name).build(num_ranks, num_chunks)


def placement_schedule(name: str, num_ranks: int) -> Schedule:
    """The smallest valid schedule of ``name`` on ``num_ranks`` ranks: for questions
    about the placement (stages per rank, which copy is primary), which does not depend
    on the number of micro-batches.  Raises the generator's ``ValueError`` for a rank
    count the schedule does not support (DualPipe: odd)."""
    return get_schedule(name, num_ranks, spec_of(name).min_chunks(num_ranks))


def _dual_bubble(PP, c):
    return (PP / 2 - 1) * (c.pair + c.b - 3 * c.w)


register(ScheduleSpec("dualpipe", dualpipe, "DualPipe", lambda P: 2 * P,
                      bubble=_dual_bubble, activations=lambda PP: PP + 1,
                      supports=lambda P: P >= 2 and P % 2 == 0))
register(ScheduleSpec("dualpipev", dualpipev, "DualPipeV", lambda P: 2 * P,
                      bubble=_dual_bubble, activations=lambda PP: PP + 1,
                      legs=(", down the V", ", back up the V")))
register(ScheduleSpec("1f1b", one_f_one_b, "1F1B", lambda P: P,
                      bubble=lambda PP, c: (PP - 1) * (c.f + c.b), activations=lambda PP: PP))
register(ScheduleSpec("fb-only", fb_only, "F&B, no pipeline", lambda P: 1,
                      supports=lambda P: P == 1))
register(ScheduleSpec("zb1p", zb1p, "ZB1P", lambda P: P,
                      bubble=lambda PP, c: (PP - 1) * (c.f + c.b - 2 * c.w),
                      activations=lambda PP: PP))


# --------------------------------------------------------------------------- lowering


def lower(s: Schedule) -> tuple[tuple[Action, ...], ...]:
    """Insert the sends and receives each rank needs, returning per-rank lists.

    A send follows the compute that produced its tensor.  A receive is placed just
    before the compute that consumes it, except that receives on one channel (one
    sender, one receiver) are kept in the order the sender sends, so that
    untagged in-order transports (NCCL) match them; a receive needed early is
    preceded by the channel's earlier messages.  Transfers between two chunks of
    the same rank (the bottom of DualPipeV's V) need no communication.

    Computed once per :class:`Schedule` object and kept on it (``s.lowered``); the
    pass itself is linear in the number of actions.
    """
    return s.lowered


@gc_paused()
def _lower(s: Schedule) -> tuple[tuple[Action, ...], ...]:
    """The uncached pass behind :func:`lower`."""
    P = s.num_ranks
    links = s.neighbours
    # 1. each compute's sends, and the message order on each channel (src, dst);
    #    a message is named (F|B, receiving chunk, micro-batch)
    chan_sends: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    out_sends: list[list[list[Action]]] = []
    for r in range(P):
        per_action = []
        for a in s.actions[r]:
            sends = []
            for kind, c, m in a.parts():
                prev, nxt = links[r][c]
                if kind == F and nxt is not None and nxt[0] != r:
                    sends.append(Action(SEND_F, c, m, peer=nxt[0]))
                    chan_sends.setdefault((r, nxt[0]), []).append((F, nxt[1], m))
                elif kind in (B, I) and prev is not None and prev[0] != r:
                    sends.append(Action(SEND_B, c, m, peer=prev[0]))
                    chan_sends.setdefault((r, prev[0]), []).append((B, prev[1], m))
            per_action.append(sends)
        out_sends.append(per_action)
    # where each message sits in its channel's order (a broken schedule that sends a
    # message twice gets it matched at its first send; validate() rejects it anyway)
    chan_index: dict[tuple[int, int], dict[tuple[str, int, int], int]] = {}
    for ch, seq in chan_sends.items():
        index = chan_index[ch] = {}
        for k, msg in enumerate(seq):
            index.setdefault(msg, k)
    # 2. receives, in channel order, as late as possible
    result = []
    for r in range(P):
        taken: dict[int, int] = {}  # src -> number of messages received so far
        acts: list[Action] = []
        for a, sends in zip(s.actions[r], out_sends[r]):
            for kind, c, m in a.parts():
                prev, nxt = links[r][c]
                if kind == F and prev is not None and prev[0] != r:
                    src, want = prev[0], (F, c, m)
                elif kind in (B, I) and nxt is not None and nxt[0] != r:
                    src, want = nxt[0], (B, c, m)
                else:
                    continue
                k = taken.get(src, 0)
                at = chan_index.get((src, r), {}).get(want, -1)
                if at < k:
                    continue  # already received ahead of time, or never sent: validate() reports it
                for mk, mc, mm in chan_sends[(src, r)][k:at + 1]:
                    acts.append(Action(RECV_F if mk == F else RECV_B, mc, mm, peer=src))
                taken[src] = at + 1
            acts.append(a)
            acts.extend(sends)
        result.append(tuple(acts))
    return tuple(result)
