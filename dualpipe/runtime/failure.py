"""The failure protocol: every failure stops every rank, with one message.

Where a failure is recorded for every rank to read is a *board*
(:mod:`dualpipe.failures`: the shared-memory one, or one on the process group's store).
:meth:`FailureProtocol._failed` turns an exception into the :class:`PipelineError` this
rank raises: its own failure is recorded as it is; a failed transfer is first looked up
(another rank's record wins) and otherwise diagnosed (:meth:`FailureProtocol._diagnose`:
a rank that died or stopped answering, else the transfer's peer).  Then the transports
are dropped (:meth:`FailureProtocol._release`), which ends every other rank's pending
transfer at once.  :meth:`FailureProtocol._step_failed` adds the end-of-step rule: a step
that any rank completed the agreement of is complete on every rank, and its failure is
raised by the next step.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
import weakref

from overlap.connect import release_groups
from overlap.p2p import PeerError, PeerExited, PeerTimeout

from ..failures import RECORD_DEADLINE, Record, ShmBoard, StoreBoard, StoreUnresponsive
from .errors import PipelineError, PipelineTimeout
from .transport import store_host

__all__ = ["FailureProtocol", "AGREEMENT"]

log = logging.getLogger("dualpipe.runtime")

AGREEMENT = "end of step (agreement)"  # the action name of the end-of-step agreement


class FailureProtocol:
    """The failure side of :class:`~dualpipe.runtime.PipelineRuntime` (a mixin)."""

    rank: int
    num_ranks: int

    def _open_board(self, shm, store, prefix: str, rank_mapping, timeout: float) -> None:
        """Set up where a failure is recorded for every rank to read: the shared-memory
        board, else one on the group's store (none without a store).  A store that does
        not answer is a :class:`PipelineTimeout` naming its host."""
        if shm is not None:
            self._board = ShmBoard(shm, rank_mapping)
        elif store is not None:
            try:
                self._board = StoreBoard(store, prefix, self.rank, self.num_ranks,
                                         store_host(self.group, rank_mapping), timeout)
            except StoreUnresponsive as e:
                self._release(failed=True)
                raise PipelineTimeout(f"building the pipeline on pipeline rank {self.rank}: the "
                                      f"process group's store did not answer within {timeout:g} "
                                      "s (its host, global rank 0, is stopped or hung)",
                                      self.rank, "construction", 0) from e
            weakref.finalize(self, self._board.close)

    def exchange(self, what: str, fn):
        """Run ``fn(transport)`` -- transfers outside ``step()`` between the pipeline's
        ranks, e.g. gradient reduction (:mod:`dualpipe.training`) or the checkpoint
        agreement (:mod:`dualpipe.checkpoint`) -- with the pipeline's failure handling:
        any failure stops every rank as in ``step()``, as a :class:`PipelineError`
        naming ``what``.  ``transport`` posts ``isend``/``irecv``/``all_gather`` to
        *group* ranks (see :attr:`PipelineRuntime.to_group`); a pipeline that stopped
        (closed, or after a failure) raises ``RuntimeError``."""
        if self._stopped is not None:
            raise RuntimeError(self._stopped)
        try:
            return fn(self._p2p)
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, what, e.__traceback__) from e

    def failure_record(self) -> str | None:
        """The failure another rank recorded for this pipeline, if any (one board read;
        the abort callback of a host-side wait, see :meth:`overlap.p2p.Handle.wait`)."""
        rec = self._board.read() if self._board is not None else None
        return None if rec is None else rec.text

    @property
    def _abort(self):
        """The abort callback of host-side waits: the store-backed record (gloo, NCCL).
        Shared memory needs none: a failing rank's stop flag ends every wait itself."""
        board = self._board
        return self.failure_record if board is not None and board.waits_poll_record else None

    def _step_failed(self, e: Exception, action: str, agreed: bool) -> None:
        """A step failed at ``action`` with ``e`` (the executor has dropped its own
        references to the transfers).  Raises the :class:`PipelineError` every rank
        raises -- unless the step is complete on every rank (some rank completed its
        end-of-step agreement, so every rank had contributed to it): then it returns,
        and the next step raises the error, so no two ranks disagree on which step
        failed (dualpipe.failures)."""
        committed = agreed
        if not agreed and action == AGREEMENT and isinstance(e, PeerError) \
                and self._board is not None:
            # close this rank's connections first: a rank still blocked in the
            # all_gather (waiting for data this rank will never forward) then fails
            # at once and votes, instead of holding the vote to its deadline
            traceback.clear_frames(e.__traceback__)  # its frames hold the transfers
            self._release(failed=True)
            committed = self._board.agreement_committed(self._agreements + 1)
        err = self._failed(e, action, e.__traceback__)
        if not committed:
            raise err from e
        log.warning("pipeline rank %d: step %d completed on every rank; the failure "
                    "after it is raised by the next step: %s", self.rank, self.steps_done + 1,
                    err)
        if not agreed:
            self._agreements += 1
        self._stopped_error = err

    def _failed(self, e: BaseException, action: str, tb=None) -> PipelineError:
        """Turn ``e`` (raised at ``action`` on this rank) into the error every rank raises.

        A failure of this rank's own (an exception in a stage, a check of the runtime)
        is recorded as it is.  A failed transfer (:class:`overlap.p2p.PeerError`) is
        first looked up: when another rank recorded a failure, this rank raises that
        one, adding where it stopped.  Otherwise this rank finds the culprit: a rank
        whose process died or stopped answering (dualpipe.failures), else the peer of
        the transfer.  The first record written is the one every rank raises; then
        the transports are dropped, which ends every other rank's pending transfer at
        once.  The user's process group stays usable; this pipeline object does not:
        build a new one to go on."""
        if isinstance(e, PipelineError) and getattr(e, "_reported", False):
            return e  # made here already (recorded, or read from another rank's record)
        if tb is not None:  # finished frames below the caller may hold transfers
            traceback.clear_frames(tb)
        rank, board = self.rank, self._board
        if board is not None:
            # first of all: ranks voting on this step's agreement (gloo) stop waiting for
            # this one, which is alive (its heartbeat goes on) but will never complete it
            board.will_not_agree(self._agreements + 1)
        where = f"pipeline rank {rank}, action {action}"
        rec, mine = None, True
        if isinstance(e, PeerError):
            rec = board.read() if board is not None else None
            mine = rec is None
            if mine:
                rec, mine = self._diagnose(e, where)
        else:
            # also the runtime's own checks in the loop (a PipelineError that says what
            # went wrong): recorded like any failure, so the other ranks stop too
            text = str(e)
            if text.startswith(where + ": "):  # said where already: do not say it twice
                text = text[len(where) + 2:]
            what = "" if isinstance(e, PipelineError) else f"{type(e).__name__}: "
            rec = Record(rank, "error", f"{where}: {what}{text}")
        if mine and board is not None and not board.write(rec):
            other = board.read()  # another rank recorded first: every rank raises that one
            if other is not None:
                rec, mine = other, False
        msg = rec.text if mine else f"{rec.text} (pipeline rank {rank} stopped at action {action})"
        if not mine and board is not None:
            board.ack()
        cls = PipelineTimeout if rec.kind == "timeout" else PipelineError
        err = cls(msg, rank, action, rec.culprit)
        err._reported = True
        log.error("%s", err)
        self._release(failed=True)
        self._stopped = ("this pipeline stopped after a failure (see the earlier "
                         "PipelineError); build a new DualPipe/DualPipeV to go on")
        if board is not None:
            board.wait_for_readers_at_exit()  # a no-op unless this process hosts the store
        return err

    def _diagnose(self, e: PeerError, where: str) -> tuple[Record, bool]:
        """The record for a failed transfer nobody has recorded: ``(record, mine)``, where
        ``mine`` is False when another rank's record turned up meanwhile."""
        board = self._board
        g = getattr(e, "peer", -1)
        peer = self._to_pipe[g] if 0 <= g < self.num_ranks else None
        if board is None:
            kind = "timeout" if isinstance(e, PeerTimeout) else "lost"
            return Record(peer, kind, f"{where}: {e}"), True
        try:
            silent = set(board.silent_in_vote) or board.not_responding()
        except StoreUnresponsive:
            silent = None
        if silent is None or board.unresponsive:  # the store's host itself is silent
            h = board.host
            who = f"pipeline rank {h}" if h is not None else "global rank 0 (not in this pipeline)"
            if board.gone:
                return Record(h, "lost", f"{where}: {e}; the process group's store, hosted by "
                              f"{who}, is gone: that process died"), True
            return Record(h, "timeout", f"{where}: {e}; the process group's store, hosted by "
                          f"{who}, does not answer either: that process is stopped or "
                          "hung"), True
        if silent and board.late_records and peer is not None \
                and peer not in silent and not isinstance(e, (PeerTimeout, PeerExited)):
            # the transfer's peer is alive and closed the connection: it is stopping the
            # pipeline and its record is on the way.  (gloo closes every connection of a
            # rank whose own wait timed out at once, before that rank has diagnosed and
            # written its record; blaming the silent rank here would call it dead.  Not
            # on shared memory: there the record is written with the stop flag, so a
            # stop without one -- the agreement's early release -- never gets one)
            rec = self._await_record()
            if rec is not None:
                return rec, False
        if silent:
            v = peer if peer in silent else min(silent)
            state = board.state(v)
            if state == "exited" or (state is None and not isinstance(e, PeerTimeout)):
                return Record(v, "lost", f"{where}: rank {v} died (its process exited or was "
                              f"killed; {e})"), True
            return Record(v, "timeout", f"{where}: {e}; rank {v} is not responding (its "
                          "process is stopped or hung)"), True
        if isinstance(e, PeerTimeout):
            return Record(peer, "timeout", f"{where}: {e}"), True
        if not isinstance(e, PeerExited):
            # the peer is alive and closed the connection: it is stopping the pipeline,
            # and its record is on the way
            rec = self._await_record()
            if rec is not None:
                return rec, False
        return Record(peer, "lost", f"{where}: {e}; another rank crashed, was killed or lost "
                      "its connection"), True

    def _await_record(self) -> Record | None:
        """Another rank's record, read until :data:`~dualpipe.failures.RECORD_DEADLINE`
        runs out (``None`` if none came)."""
        end = time.monotonic() + RECORD_DEADLINE
        while True:
            rec = self._board.read()
            if rec is not None or time.monotonic() >= end:
                return rec
            time.sleep(0.02)

    def _own_nccl_groups(self, groups: tuple) -> None:
        """Keep ``groups`` (private NCCL communicators) as the transport's backends and
        shut them down when this pipeline is garbage-collected without :meth:`close`
        (:meth:`_release` does it earlier, aborting them after a failure)."""
        self._pg = groups
        self._groups_finalizer = weakref.finalize(self, release_groups, groups, False)

    def _release(self, failed: bool) -> None:
        """Release the transports: after a failure every peer's pending transfer must end
        at once (shm stop flag, gloo connections closed, NCCL communicators aborted);
        otherwise they are closed in order (NCCL: ``shutdown()``)."""
        p2p, self._p2p = self._p2p, None
        if p2p is not None:
            p2p.close(failed=failed)  # shm: with failed=True every peer's wait ends at once
        del p2p
        pgs, self._pg = self._pg, None
        fin, self._groups_finalizer = self._groups_finalizer, None
        if fin is not None and fin.detach() is not None:  # NCCL (never gloo: see below)
            release_groups(pgs, failed)
        del pgs
        if not failed and self._board is not None:
            # (after a failure the heartbeat goes on while this object lives: a rank
            # diagnosing a failure must not take this one for a silent one)
            self._board.close()
        self.group = None
        gc.collect()  # gloo closes the connections when the last reference goes
