"""FailureProtocol._diagnose on a store-backed board, one process, no transport: which
record a rank writes for a failed transfer nobody has recorded yet.

The race these pin down was seen in CI (SIGSTOP of rank 2, gloo): a neighbour of the
frozen rank timed out inside gloo's own wait, and gloo then closed *every* connection of
that neighbour at once -- before it had diagnosed and written its record.  Rank 0, whose
receive from that (alive) neighbour failed with "Connection closed by peer", found no
record, saw rank 2 silent, and recorded "rank 2 died": every rank then raised a
PipelineError, not the PipelineTimeout a frozen rank must produce.
"""
from __future__ import annotations

import threading
import time

import pytest

from dualpipe.failures import RECORD_DEADLINE, Record, StoreBoard
from dualpipe.runtime.failure import FailureProtocol
from overlap.p2p import PeerExited, PeerLost, PeerTimeout


class Scripted:
    """A board whose liveness answer and record are set by the test."""

    def __init__(self, silent: set[int], record_after: float | None = None,
                 record: Record | None = None):  # noqa: D107 - no StoreBoard.__init__
        self.silent_in_vote: set[int] = set()
        self.unresponsive = self.gone = False
        self.host = 0
        self._silent, self._record = silent, None
        if record_after is not None:
            threading.Timer(record_after, setattr, (self, "_record", record)).start()

    def not_responding(self) -> set[int]:
        return set(self._silent)

    def read(self):
        return self._record

    def state(self, rank: int):
        return None  # a store cannot tell a dead process from a stopped one


class Board(Scripted, StoreBoard):
    """A store board (no store behind it: every answer scripted)."""


def _proto(board: Board) -> FailureProtocol:
    p = FailureProtocol.__new__(FailureProtocol)
    p.rank, p.num_ranks, p._board, p._to_pipe = 0, 4, board, [0, 1, 2, 3]
    return p


WHERE = "pipeline rank 0, action F1.2+B0.0"
TIMEOUT_REC = Record(2, "timeout", "pipeline rank 1, action F0.3: activation for F0.3: rank 2 "
                     "did not answer within 3 s; rank 2 is not responding")


def test_connection_closed_by_a_live_peer_waits_for_that_peers_record():
    board = Board({2}, record_after=0.3, record=TIMEOUT_REC)
    t0 = time.monotonic()
    rec, mine = _proto(board)._diagnose(
        PeerLost("activation for F1.2: the connection failed (Connection closed by peer)",
                 1, "activation for F1.2"), WHERE)
    assert (rec, mine) == (TIMEOUT_REC, False)
    assert 0.25 < time.monotonic() - t0 < 0.3 + 1.0


def test_connection_closed_by_a_live_peer_without_a_record_blames_the_silent_rank():
    board = Board({2})
    t0 = time.monotonic()
    rec, mine = _proto(board)._diagnose(PeerLost("closed", 1, "activation"), WHERE)
    took = time.monotonic() - t0
    assert mine and rec.culprit == 2 and rec.kind == "lost" and "rank 2 died" in rec.text
    assert RECORD_DEADLINE - 0.05 < took < RECORD_DEADLINE + 1.0


class ShmLikeBoard(Scripted):
    """The shared-memory board's answers: not a store board (its record is written with
    the stop flag, so none can arrive later) and /proc knows who exited."""

    late_records = False
    waits_poll_record = False

    def state(self, rank: int):
        return "exited" if rank in self._silent else "alive"


def test_shared_memory_stop_without_a_record_blames_the_dead_rank_at_once():
    """Seen in a sweep after the first fix: on shared memory a rank whose end-of-step
    agreement failed raises the stop flag before its record (to end the others'
    all_gather at once), so no record ever comes; waiting 2 s for one broke the 2 s
    SIGKILL promise.  The dead rank is named at once instead."""
    board = ShmLikeBoard({0})
    assert not isinstance(board, StoreBoard)
    t0 = time.monotonic()
    rec, mine = _proto(board)._diagnose(
        PeerLost("end-of-step agreement: pipeline rank (group rank 1) stopped the pipeline",
                 1, "end-of-step agreement"), WHERE)
    assert time.monotonic() - t0 < 0.5
    assert mine and rec.culprit == 0 and rec.kind == "lost" and "rank 0 died" in rec.text


@pytest.mark.parametrize("err", [PeerLost("closed", 2, "activation"),
                                 PeerExited("exited", 1, "activation"),
                                 PeerTimeout("no answer within 3 s", 1, "activation")])
def test_no_wait_when_the_peer_is_the_silent_rank_exited_or_timed_out(err):
    """The silent rank is the diagnosis at once: it is the peer itself, the peer's
    process exited, or this rank's own wait timed out."""
    t0 = time.monotonic()
    rec, mine = _proto(Board({2}))._diagnose(err, WHERE)
    assert time.monotonic() - t0 < 0.5
    assert mine and rec.culprit == 2
    assert rec.kind == ("timeout" if isinstance(err, PeerTimeout) else "lost")


# --------------------------------------------------------------------------- the vote

def test_a_rank_that_failed_during_the_step_ends_the_vote_at_once():
    """Seen in the SIGKILL sweep (gloo, DualPipeV, victim 1): rank 0 failed in I0.5 and
    recorded it; ranks 2 and 3, whose all_gather failed, voted and waited the whole 2 s
    vote deadline for rank 0 -- alive, its heartbeat going on, but never to complete
    the agreement -- and raised 2.4-2.9 s after the kill (promise: 2 s).  A failing
    rank now says at once that it will not agree (``StoreBoard.will_not_agree``)."""
    import torch.distributed as dist
    store = dist.HashStore()
    boards = [StoreBoard(store, "vote", r, 2, 0) for r in range(2)]
    try:
        boards[1].will_not_agree(1)
        t0 = time.monotonic()
        assert boards[0].agreement_committed(1, deadline=2.0) is False
        assert time.monotonic() - t0 < 0.5
        assert boards[0].silent_in_vote == set()  # it voted; it is not silent
    finally:
        for b in boards:
            b.close()
