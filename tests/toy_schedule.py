"""A schedule the project does not ship, registered the way a user adds one: GPipe
(every forward, then every backward), one stage per rank.  :func:`ensure_registered`
registers it in this process (tests/test_registry.py does, and removes it after;
spawned ranks do through tests.workers); the runtime, simulator, validator and drawer
then handle it with no other change."""
from __future__ import annotations

from dualpipe.schedules import (B, F, REGISTRY, Action, Schedule, ScheduleSpec, Stream,
                                register)

NAME = "gpipe"


def gpipe(num_ranks: int, num_chunks: int) -> Schedule:
    if num_ranks < 1 or num_chunks < 1:
        raise ValueError(f"GPipe needs num_ranks >= 1 and num_chunks >= 1, got {num_ranks}, "
                         f"{num_chunks}")
    acts = tuple(tuple([Action(F, 0, m) for m in range(num_chunks)] +
                       [Action(B, 0, m) for m in range(num_chunks)]) for _ in range(num_ranks))
    return Schedule(NAME, num_ranks, num_chunks, (Stream(num_ranks, num_chunks, 0),),
                    tuple(((0, r),) for r in range(num_ranks)), acts)


def ensure_registered() -> None:
    if NAME not in REGISTRY:
        register(ScheduleSpec(NAME, gpipe, "GPipe", lambda P: 1,
                              bubble=lambda PP, c: (PP - 1) * (c.f + c.b),
                              activations=lambda PP: None))
