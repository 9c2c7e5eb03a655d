"""How the ranks of a pipeline stop together, and agree on who failed, when one fails.

:class:`dualpipe.runtime.PipelineRuntime` turns every failure into one *record*: the
pipeline rank where it began (``culprit``), its kind (``error``: an exception on that
rank; ``timeout``: a rank stopped answering; ``lost``: a rank's process died) and a
message.  The first rank to fail writes it to a *board* every rank can read without the
failing rank's help, then stops the transport, which ends every other rank's pending
wait; those ranks read the record and raise the same error.  Two boards:

* :class:`ShmBoard` (shared-memory transport): the record lives in the transport's
  shared board, next to its stop flag; liveness comes from ``/proc`` (a process that
  exited, or that is stopped by SIGSTOP or a debugger).  No store is involved, so a
  frozen rank 0 (which hosts the process group's store) cannot stall anyone.
* :class:`StoreBoard` (gloo, NCCL): the record lives in the process group's store, and a
  daemon thread per pipeline posts a heartbeat every :data:`BEAT_EVERY` seconds, which
  also carries how many steps this rank has agreed.  A rank whose heartbeat does not move
  for :data:`STALE_AFTER` seconds is *not responding* (dead, stopped or hung).  Every
  store call has a deadline (:func:`store_call`): TCPStore's client blocks without bound
  while the process hosting it is stopped, so the calls run on a private thread and a
  store that does not answer is itself the diagnosis (its host is the culprit).

The end-of-step agreement (an ``all_gather``) can end differently on different ranks when
a rank dies in the middle of it on gloo: ranks that received every contribution return,
the others fail.  A rank whose agreement failed therefore asks the board what the others
did (:meth:`StoreBoard.agreement_committed`): if any live rank completed it, every rank
had finished the step, so this rank returns normally too (the pipeline is stopped and
the next step raises); otherwise every rank raises.  On shared memory the agreement is
one shared board and all-or-nothing already.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from typing import Callable, NamedTuple

log = logging.getLogger(__name__)

BEAT_EVERY = 0.15     # s between a rank's heartbeats (StoreBoard)
STALE_AFTER = 0.5     # s without a heartbeat: that rank is not responding
CALL_DEADLINE = 1.0   # s: the longest one store call may take
AGREE_DEADLINE = 2.0  # s a rank whose agreement failed waits to learn what the others did
RECORD_DEADLINE = 2.0 # s a rank whose peer closed its connection waits for that peer's record
ACK_DEADLINE = 5.0    # s the process hosting the store waits at exit for readers


class StoreUnresponsive(RuntimeError):
    """A store call did not return within its deadline (or a previous one is stuck)."""


class Record(NamedTuple):
    """A pipeline's failure: where it began, what kind, the message every rank shows."""

    culprit: int | None
    kind: str   # "error" | "timeout" | "lost"
    text: str

    def encode(self) -> str:
        return f"{-1 if self.culprit is None else self.culprit}\n{self.kind}\n{self.text}"

    @staticmethod
    def decode(s: str) -> "Record":
        parts = s.split("\n", 2)
        if len(parts) != 3 or parts[1] not in ("error", "timeout", "lost"):
            return Record(None, "error", s)  # not ours: shown as it is
        c = int(parts[0])
        return Record(None if c < 0 else c, parts[1], parts[2])


# ---------------------------------------------------------------------- store calls
class _Caller:
    """Runs store calls on one private daemon thread, so that each call has a deadline.

    One per process: the store's client serializes its calls anyway, so a call that
    hangs (its host is stopped) holds up every later one; once one has run longer than
    the deadline, later calls fail at once until it returns (the store recovered)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._since: float | None = None  # when the running call started
        self._hung = False  # a caller gave up on the running call (cleared when it returns)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="dualpipe-store",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, args, box, done = self._q.get()
            self._since = time.monotonic()
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append((False, e))
            self._since = None
            self._hung = False
            done.set()

    def call(self, fn: Callable, *args, timeout: float = CALL_DEADLINE):
        since = self._since
        # (a call that timed out is hung even if its deadline has only just passed: the
        # clock test alone let the next call queue behind it for another full deadline)
        if since is not None and (self._hung or time.monotonic() - since > CALL_DEADLINE):
            raise StoreUnresponsive(f"a store call has been waiting for "
                                    f"{time.monotonic() - since:.1f} s")
        self._start()
        box: list = []
        done = threading.Event()
        self._q.put((fn, args, box, done))
        if not done.wait(timeout):
            if self._since is not None:
                self._hung = True
            raise StoreUnresponsive(f"the store did not answer within {timeout:g} s")
        ok, value = box[0]
        if ok:
            return value
        raise value


_caller = _Caller()


def store_call(fn: Callable, *args, timeout: float = CALL_DEADLINE):
    """``fn(*args)`` (a method of a c10d store) with a deadline: raises
    :class:`StoreUnresponsive` when it does not return within ``timeout`` seconds."""
    return _caller.call(fn, *args, timeout=timeout)


# ---------------------------------------------------------------------- boards
class StoreBoard:
    """Failure record, heartbeats and end-of-step votes in the process group's store
    (pipelines on gloo or NCCL).  ``rank``/``world``: pipeline ranks; ``host``: the
    pipeline rank whose process hosts the store (``None`` if none of them does)."""

    #: a record can land after the connection that reported the failure closed (gloo
    #: closes a rank's connections when its own wait times out, before it records)
    late_records = True
    #: the record alone stops nobody: host-side waits poll it (their abort callback)
    waits_poll_record = True

    def __init__(self, store, prefix: str, rank: int, world: int, host: int | None,
                 timeout: float = CALL_DEADLINE) -> None:
        self.store, self.prefix, self.rank, self.world, self.host = \
            store, prefix, rank, world, host
        self.unresponsive = False  # a store call timed out (its host is stopped or hung)
        self.gone = False          # a store call failed (its host exited)
        #: end-of-step agreements this rank completed (the runtime counts; beats carry it)
        self.agreed = 0
        #: the ranks a failed vote (:meth:`agreement_committed`) saw stop responding;
        #: the diagnosis that follows uses them instead of looking a second time
        self.silent_in_vote: set[int] = set()
        self._key = f"{prefix}/failure"
        self._stop = threading.Event()
        self._acks_at_exit = False
        # the first beat before any step, so that every rank's beat key exists
        store_call(store.set, self._beat_key(rank), "0:0", timeout=timeout)
        threading.Thread(target=self._beat, name=f"dualpipe-heartbeat-{rank}",
                         daemon=True).start()

    def _beat(self) -> None:
        """The heartbeat thread: ``count:agreed`` every BEAT_EVERY seconds until closed
        (a beat that cannot be posted is skipped: a silent rank is the diagnosis)."""
        key, n = self._beat_key(self.rank), 0
        while not self._stop.wait(BEAT_EVERY):
            n += 1
            try:
                store_call(self.store.set, key, f"{n}:{self.agreed}")
            except Exception:  # noqa: BLE001
                pass

    def _beat_key(self, r: int) -> str:
        return f"{self.prefix}/beat/{r}"

    def close(self) -> None:
        self._stop.set()

    # -- records
    def read(self) -> Record | None:
        try:
            if not store_call(self.store.check, [self._key]):
                return None
            return Record.decode(store_call(self.store.get, self._key).decode())
        except StoreUnresponsive:
            self.unresponsive = True
        except Exception as e:  # noqa: BLE001 - the store is gone (its host exited)
            log.debug("reading the failure record failed: %s", e)
            self.unresponsive = self.gone = True
        return None

    def write(self, rec: Record) -> bool:
        """Record ``rec`` unless a record exists; True if this one is the record."""
        try:
            if store_call(self.store.add, self._key + "/count", 1) == 1:
                store_call(self.store.set, self._key, rec.encode())
                return True
        except StoreUnresponsive:  # nobody can read it anyway
            self.unresponsive = True
        except Exception:  # noqa: BLE001 - gone with its host
            self.unresponsive = self.gone = True
        return False

    def ack(self) -> None:
        try:
            store_call(self.store.add, self._key + "/acks", 1)
        except Exception:  # noqa: BLE001
            pass

    # -- liveness
    def _beats(self, ranks) -> dict[int, tuple[int, int]]:
        out = {}
        for r in ranks:
            count, agreed = store_call(self.store.get, self._beat_key(r)).decode().split(":")
            out[r] = (int(count), int(agreed))
        return out

    def not_responding(self, window: float = STALE_AFTER) -> set[int]:
        """The other ranks whose heartbeat did not move during ``window`` seconds.
        Raises :class:`StoreUnresponsive` if the store does not answer (or is gone)."""
        others = [r for r in range(self.world) if r != self.rank]
        try:
            before = self._beats(others)
            time.sleep(window)
            after = self._beats(others)
        except StoreUnresponsive:
            self.unresponsive = True
            raise
        except Exception as e:  # noqa: BLE001 - the store's host exited
            self.unresponsive = self.gone = True
            raise StoreUnresponsive(f"the store failed ({e})") from e
        return {r for r in others if after[r][0] == before[r][0]}

    # -- end-of-step agreement
    def agreement_committed(self, step: int, deadline: float = AGREE_DEADLINE) -> bool:
        """This rank's agreement on step ``step`` (1-based count of agreements) failed:
        did another live rank complete it?  Waits until every other rank completed it,
        voted that its own failed, or stopped responding (at most ``deadline`` s)."""
        try:
            store_call(self.store.set, f"{self.prefix}/agree/{step}/{self.rank}", "failed")
            pending = {r for r in range(self.world) if r != self.rank}
            first = self._beats(pending)
            seen_at = {r: time.monotonic() for r in pending}
            end = time.monotonic() + deadline
            while pending and time.monotonic() < end:
                beats = self._beats(pending)
                now = time.monotonic()
                for r in list(pending):
                    if beats[r][1] >= step:
                        return True  # r completed it: every rank had finished the step
                    if store_call(self.store.check, [f"{self.prefix}/agree/{step}/{r}"]):
                        pending.discard(r)
                    elif beats[r][0] != first[r][0]:
                        first[r], seen_at[r] = beats[r], now
                    elif now - seen_at[r] > STALE_AFTER:
                        pending.discard(r)  # not responding: it completes nothing
                        self.silent_in_vote.add(r)
                time.sleep(0.02)
        except Exception as e:  # noqa: BLE001 - no store: nobody can have learnt more
            log.debug("end-of-step vote failed: %s", e)
            self.unresponsive = True
        return False

    def will_not_agree(self, step: int) -> None:
        """Tell the ranks voting on agreement ``step`` that this rank will never
        complete it (it failed during the step): its vote is "failed" at once, so a
        voter does not wait its deadline for a live rank that stopped elsewhere."""
        try:
            store_call(self.store.set, f"{self.prefix}/agree/{step}/{self.rank}", "failed")
        except StoreUnresponsive:  # the diagnosis then names the store's host
            self.unresponsive = True
        except Exception as e:  # noqa: BLE001 - gone with its host; the deadline bounds it
            log.debug("posting the failed vote failed: %s", e)
            self.unresponsive = self.gone = True

    def state(self, rank: int) -> str | None:
        """A rank's process state: a store cannot tell (see :meth:`ShmBoard.state`)."""
        return None

    def wait_for_readers_at_exit(self) -> None:
        """If this rank's process hosts the store, keep it up at exit until the other
        live ranks have read the record (or :data:`ACK_DEADLINE` passed)."""
        if self._acks_at_exit or self.host != self.rank:
            return
        self._acks_at_exit = True
        atexit.register(_wait_acks, self, time.monotonic)


def _wait_acks(board: StoreBoard, clock) -> None:
    end = clock() + ACK_DEADLINE
    need = board.world - 1
    while clock() < end:
        try:
            if store_call(board.store.add, board._key + "/acks", 0) >= need:
                return
            # a whole STALE_AFTER window: on a loaded host a live rank's heartbeat thread
            # can miss a shorter one, and leaving before it read the record makes it
            # blame this host (seen: a 0.3 s window let the host exit under a live reader)
            need = board.world - 1 - len(board.not_responding(STALE_AFTER))
        except Exception:  # noqa: BLE001
            return


class ShmBoard:
    """The record on the shared-memory transport's own board (see
    :meth:`overlap.shm.ShmP2P.stop`); ``to_pipe[g]``: the pipeline rank of group rank g."""

    unresponsive = gone = False
    host = None
    late_records = False  # the record is written with the stop flag, or never
    waits_poll_record = False  # the stop flag ends every wait itself
    silent_in_vote: set[int] = set()  # no votes here (see StoreBoard)

    def __init__(self, shm, to_pipe: list[int]) -> None:
        self.shm, self.to_pipe = shm, to_pipe

    def read(self) -> Record | None:
        text = self.shm.stop_message()
        return None if text is None else Record.decode(text)

    def write(self, rec: Record) -> bool:
        return self.shm.stop(rec.encode())

    def not_responding(self, window: float = 0.0) -> set[int]:
        """Pipeline ranks whose process exited or is stopped (``/proc``)."""
        out = set()
        for g in range(self.shm.world):
            if g != self.shm.rank and self.shm.peer_state(g) in ("exited", "stopped"):
                out.add(self.to_pipe[g])
        return out

    def state(self, pipe_rank: int) -> str | None:
        return self.shm.peer_state(self.to_pipe.index(pipe_rank))

    def ack(self) -> None:
        pass

    def close(self) -> None:
        pass

    def agreement_committed(self, step: int, deadline: float = 0.0) -> bool:
        return False  # the shared board's all_gather is all-or-nothing

    def will_not_agree(self, step: int) -> None:
        pass  # no votes here

    def wait_for_readers_at_exit(self) -> None:
        pass
