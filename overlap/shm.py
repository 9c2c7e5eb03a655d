"""Shared-memory point-to-point transport for pipeline ranks on one host (CPU tensors).

gloo on loopback costs ~110 us per message one way on a small VM
(``python -m bench.p2p_latency``), most of it thread hand-offs and socket wake-ups inside gloo (``python -m bench.overhead`` shows the c10d
calls dominating both our runtime and torch's).  When every rank of a pipeline runs on
the same host, :class:`ShmP2P` moves the same messages through shared memory instead:

* one single-producer single-consumer byte ring per (sender, receiver) pair, created
  on first use in ``/dev/shm`` (unlinked as soon as both ends have mapped it), its pages
  reserved and mapped present at once, so RSS does not creep up with traffic;
* a message is a 24-byte header ``(tag, nbytes, layout)`` plus the bytes of all its
  tensors (several tensors travel as one message; ``layout`` hashes each tensor's size
  so a receive split differently is refused); messages larger than the ring stream
  through it;
* receives match messages by (peer, tag) in order, like gloo's; a message that arrives
  before its receive is posted is kept aside and copied when the receive is posted;
* a send is complete as soon as its bytes are in the ring, so the sender's buffers are
  free at once; a full ring queues the rest, written by the progress engine that runs
  in every wait (so no send ever blocks a rank that waits for something else);
* waiting sleeps on a per-rank futex "bell" that writers ring (a system call only when
  someone sleeps) -- see ``csrc/cpu/shm.cpp``;
* ``all_gather`` of small tensors (the runtime's step handshake and end-of-step
  agreement) goes through a shared board, without any round trip to a store.

Failure behaviour matches :class:`overlap.p2p.P2P` on gloo: every wait has a timeout
(:class:`~overlap.transport.PeerTimeout`, naming the peer and what was awaited); a peer
process that exits is noticed within ~50 ms (:class:`~overlap.transport.PeerLost`); a rank
that stops the pipeline (:meth:`ShmP2P.close` with ``failed=True``) raises a flag every
waiting rank sees at once; and the ``abort`` callback (the runtime's failure record in
the store) is polled every ~50 ms while blocked.

:func:`ShmP2P.create` is collective: every rank of the group calls it with the same
store and prefix, and all agree (through the store) either on the shared-memory
transport or on falling back, so no rank ever waits for a transport the others did not
pick.  It needs the compiled extension (``overlap._C``) and Linux futexes.
"""

from __future__ import annotations

import array
import datetime
import glob
import logging
import mmap
import os
import tempfile
import time
import uuid
import weakref
from collections import deque
from typing import Callable, Sequence

import torch

from .transport import PeerAborted, PeerError, PeerExited, PeerLost, PeerTimeout, TransferHandle

__all__ = ["ShmP2P", "ShmHandle", "ShmUnavailable", "DEFAULT_RING_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_RING_BYTES = 4 << 20   # per (sender, receiver) pair; larger messages stream through
_RING_HEADER = 128             # csrc/cpu/dp_cpu.h kRingHeaderBytes: head @0, tail @64
_OPENS = 32                    # ends that have mapped the ring (the second one unlinks it)
_BLOCKED = 40                  # > 0: the writer waits for space (the reader rings it)
_GATHER_BYTES = 256            # largest all_gather payload per rank
_ROW = 1024                    # per-rank board row: bell @0, sleepers @4, pid @8, process start
                               # time @16, pid namespace @24, closed @32; gather slots @64
_BOARD_HEADER = 64             # joined @8, stopped by (group rank + 1) @16, stop count @24,
                               # stop message length @32 (the message follows the rows)
_STOP_MESSAGE = 4096           # bytes for the stop message (see ShmP2P.stop)
_MAGIC = 0x44505348           # "DPSH"
_CHECK_EVERY = 0.05            # s between liveness / abort-callback checks while blocked
_HEADER = 24                   # message header: tag, bytes, layout (hash of each tensor's bytes)


class ShmUnavailable(RuntimeError):
    """The shared-memory transport cannot run here (the message says why)."""


def _ext():
    from ._ext import load_extension
    mod = load_extension()
    if mod is None or not hasattr(mod, "ring_write"):
        from ._ext import extension_error
        why = extension_error() or "it predates the shared-memory transport; rebuild it"
        raise ShmUnavailable(f"the compiled extension is needed ({why})")
    if not mod.shm_supported():
        raise ShmUnavailable("futexes are not available on this platform (Linux only)")
    return mod


def _map(path: str, size: int, populate: bool = False) -> tuple[tuple, int]:
    """Map ``path`` (created at ``size`` bytes if new) shared; return ((mmap, uint8 tensor
    over it), its address).  Keep the first item alive while the address is used.

    The file's pages are reserved up front (``posix_fallocate``): on a full tmpfs that
    fails here with ENOSPC instead of killing the process with SIGBUS at a later write.
    ``populate`` also maps every page at once (``MAP_POPULATE``), so the process's RSS
    holds the whole file from the start instead of growing as pages are first touched.
    A file this call created is removed again if anything here fails (no leftovers)."""
    while True:  # (the other end may unlink the file between the two opens: retry)
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), True
            break
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
                break
            except FileNotFoundError:
                continue
    try:
        if os.fstat(fd).st_size < size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise OSError(e.errno, f"cannot reserve {size} bytes for {path} ({e.strerror}); "
                              "free space there, or use transport='group'") from e
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        buf = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping's address stable
    except BaseException:
        if created:
            _unlink(path)
        raise
    finally:
        os.close(fd)
    return (mm, buf), buf.data_ptr()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _cleanup(patterns: tuple[str, ...], out_rings: dict, mods, failed: bool,
             pid: int | None = None) -> None:
    """Remove the ring files of this rank's pairs that still have a name (the other end
    never opened them, e.g. because its process died) -- except, unless the pipeline
    failed, a ring this rank writes to that holds completed sends its reader has not
    opened yet: the reader unlinks it when it opens it."""
    if pid is not None and pid != os.getpid():
        return  # a forked child: the files belong to its parent
    keep = set()
    if not failed:
        for ring in out_rings.values():
            if mods.load_acquire(ring.addr + _OPENS) == 1 and mods.ring_available(ring.addr):
                keep.add(ring.path)
    for pattern in patterns:
        for p in glob.glob(pattern):
            if p not in keep:
                _unlink(p)


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time) of process ``pid`` from ``/proc``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    rest = stat[stat.rfind(b")") + 2:].split()
    return rest[0], int(rest[19])


def _identity() -> tuple[int, int]:
    """(start time, pid namespace) of this process, (0, 0) where /proc cannot tell."""
    try:
        st = _proc_stat(os.getpid())
        return (st[1] if st else 0), os.stat("/proc/self/ns/pid").st_ino
    except (OSError, ValueError, IndexError):
        return 0, 0


class ShmHandle(TransferHandle):
    """A pending send, receive or all_gather; ``wait()`` returns the tensors (the
    :class:`~overlap.transport.TransferHandle` of :class:`ShmP2P`)."""

    __slots__ = ("p2p", "segs", "nbytes", "layout", "seq")  # + tensors, what, peer, done

    def __init__(self, p2p: "ShmP2P", tensors, what: str, peer: int):
        self.p2p, self.tensors, self.what, self.peer = p2p, tensors, what, peer
        self.done = False
        self.segs: list = []   # receives: (address, bytes) of each buffer
        self.nbytes = 0        # receives: bytes expected
        self.layout = 0        # receives: the expected layout (see _layout)
        self.seq = 0           # all_gather: its sequence number

    def is_completed(self) -> bool:
        if not self.done and self.p2p._mods is not None:
            self.p2p._progress()
        return self.done

    def wait(self, timeout: datetime.timedelta, abort: Callable[[], str | None] | None = None,
             *, host: bool = False) -> list[torch.Tensor]:
        """Block until done (running the transport's progress meanwhile); raise
        :class:`PeerTimeout` after ``timeout``, :class:`PeerLost` if the peer's process
        exits or the pipeline is stopped, :class:`PeerAborted` if ``abort()`` (or the
        transport's own ``abort`` callback) returns a message.  ``host`` is accepted for
        the interface of :meth:`overlap.p2p.Handle.wait`: a CPU transport's waits
        always block the host."""
        if not self.done:
            self.p2p._wait(self, timeout, abort)
        return self.tensors


class _Out:
    __slots__ = ("handle", "segs", "i", "off", "keep")

    def __init__(self, handle, segs, keep):
        self.handle, self.segs, self.keep = handle, segs, keep
        self.i = self.off = 0


class _In:
    __slots__ = ("tag", "handle", "segs", "i", "off", "stash", "claim", "layout")

    def __init__(self, tag, handle, segs, stash, layout):
        self.tag, self.handle, self.segs, self.stash = tag, handle, segs, stash
        self.layout = layout
        self.i = self.off = 0
        self.claim = None


class _Ring:
    __slots__ = ("path", "keep", "addr", "cap", "peer", "cur", "hdr", "hdr_addr")

    def __init__(self, path, keep, addr, cap, peer):
        self.path, self.keep, self.addr, self.cap, self.peer = path, keep, addr, cap, peer
        self.cur = None
        self.hdr = array.array("q", [0, 0, 0])
        self.hdr_addr = self.hdr.buffer_info()[0]


class ShmP2P:
    """Point-to-point transfers and small all_gathers among the ranks of one host.

    The interface is :class:`overlap.transport.Transport`, as for :class:`overlap.p2p.P2P`
    (``isend``, ``irecv``, ``all_gather``, handles with ``wait(timeout, abort)``, ``poll``,
    ``close``), with group ranks.  Build it with
    :meth:`create`; call :meth:`close` when done (``failed=True`` stops every peer's
    pending waits at once).  One thread per process uses it (as the pipeline runtime
    does): it is not thread-safe, unlike gloo's process groups."""

    def __init__(self, mods, board, board_addr: int, directory: str, token: str, rank: int,
                 world: int, ring_bytes: int, abort: Callable[[], str | None] | None):
        self._mods = mods
        self._board, self._base = board, board_addr
        self.directory, self.token = directory, token
        self.rank, self.world = rank, world
        self.ring_bytes = int(ring_bytes)
        self._abort_cb = abort
        self._out: dict[int, _Ring] = {}
        self._in: dict[int, _Ring] = {}
        self._inbound: list[_Ring] = []
        self._sendq: dict[int, deque] = {}
        self._pending_sends = 0
        self._posted: dict[tuple, deque] = {}
        self._unexpected: dict[tuple, deque] = {}
        self._gathers = 0
        self._gather: ShmHandle | None = None
        self._bells = [self._row(r) for r in range(world)]
        self._pids = [mods.load_acquire(self._row(r) + 8) for r in range(world)]
        self._starts = [mods.load_acquire(self._row(r) + 16) for r in range(world)]
        ns = {mods.load_acquire(self._row(r) + 24) for r in range(world)}
        # pids mean the same thing to every rank only inside one pid namespace
        self._liveness = len(ns) == 1 and 0 not in ns and 0 not in self._starts
        self._closed = False
        self._stopped_here = False
        self._broken: str | None = None
        # ring files only one side has opened keep their names: this rank's (it is one
        # end) are removed at close or exit; never other pairs', which may be in use
        d = glob.escape(directory)
        self._patterns = (os.path.join(d, f"dualpipe-{token}-{rank}-*"),
                          os.path.join(d, f"dualpipe-{token}-*-{rank}"))
        weakref.finalize(self, _cleanup, self._patterns, self._out, mods, False, os.getpid())

    # ------------------------------------------------------------------ setup
    @classmethod
    def create(cls, store, prefix: str, rank: int, world: int, *, mode: str = "auto",
               timeout: float = 300.0, ring_bytes: int = DEFAULT_RING_BYTES,
               abort: Callable[[], str | None] | None = None) -> "ShmP2P | None":
        """Collective: every rank of the group calls it with the same ``store`` and
        ``prefix``.  ``mode`` is this rank's wish: ``"auto"`` (shared memory if every rank
        can), ``"shm"`` (required: raise :class:`ShmUnavailable` on every rank if any rank
        cannot) or ``"off"``.  Returns the transport, or ``None`` when the ranks agreed
        to fall back (the same answer on every rank)."""
        usage = ""
        if mode not in ("auto", "shm", "off"):
            usage = f"shared-memory transport mode must be 'auto', 'shm' or 'off', got {mode!r}"
        elif ring_bytes < 4096:
            usage = f"ring_bytes must be at least 4096, got {ring_bytes}"
        to = datetime.timedelta(seconds=float(timeout))
        # every call on a prefix is a new agreement: the k-th call of each rank meets the
        # k-th call of the others (calls are collective, in order), never old keys
        gen = store.add(f"{prefix}/shm/calls/{rank}", 1)
        key = f"{prefix}/shm/{gen}"
        if rank == 0:
            directory = "/dev/shm" if os.path.isdir("/dev/shm") and os.access(
                "/dev/shm", os.W_OK) else tempfile.gettempdir()
            token = f"{getattr(os, 'getuid', lambda: 0)()}-{uuid.uuid4().hex[:16]}"
            store.set(f"{key}/where", f"{directory}\n{token}")
        try:
            store.wait([f"{key}/where"], to)
        except Exception as e:  # noqa: BLE001 - the store's own timeout or connection error
            raise _store_error(e, [0], to) from e
        directory, token = store.get(f"{key}/where").decode().split("\n")
        board_path = os.path.join(directory, f"dualpipe-{token}-board")
        try:
            return cls._agree(store, key, board_path, directory, token, rank, world, mode,
                              usage, to, ring_bytes, abort)
        except BaseException:
            # every rank removes the board on every way out (it may be the only rank left
            # that has it, or have created it after the others had removed theirs)
            _unlink(board_path)
            raise

    @classmethod
    def _agree(cls, store, key, board_path, directory, token, rank, world, mode, usage, to,
               ring_bytes, abort) -> "ShmP2P | None":
        """The two phases of :meth:`create` once the board's name is known."""
        mods = keep = None
        reason = ""
        if usage:
            reason = f"error: {usage}"
        elif mode == "off":
            reason = "off"
        else:
            try:
                mods = _ext()
                # rings to up to 3 peers per rank (pipeline neighbours, DualPipe's mirror)
                need = 3 * world * (_RING_HEADER + ring_bytes)
                st = os.statvfs(directory)
                if st.f_bavail * st.f_frsize < need:
                    raise ShmUnavailable(f"{directory} has {st.f_bavail * st.f_frsize >> 20} MiB "
                                         f"free, the rings may need {need >> 20} MiB")
                keep, base = _map(board_path, _BOARD_HEADER + world * _ROW + _STOP_MESSAGE)
                row = base + _BOARD_HEADER + rank * _ROW
                start, ns = _identity()
                mods.store_release(row + 8, os.getpid())
                mods.store_release(row + 16, start)
                mods.store_release(row + 24, ns)
                mods.fetch_add(base + 8, 1)
            except Exception as e:  # noqa: BLE001 - any reason is published, never raised alone
                reason = (str(e) or type(e).__name__).replace("\n", " ")
                mods = keep = None
        # phase 1: every rank has mapped the board (or says why not)
        store.set(f"{key}/p1/{rank}", f"{mode}\n{int(ring_bytes)}\n{reason}")
        p1 = [v.split("\n", 2) for v in _gather_store(store, f"{key}/p1", world, to)]
        modes = [v[0] for v in p1]
        reasons = [(r, v[2]) for r, v in enumerate(p1) if v[2]]
        sizes = [int(v[1]) for v in p1]
        errors = [f"rank {r}: {w[len('error: '):]}" for r, w in reasons if w.startswith("error: ")]
        if errors:
            raise ValueError("ShmP2P.create: " + "; ".join(errors))
        if len(set(sizes)) > 1 and "off" not in modes:
            raise ShmUnavailable(f"the ranks passed different ring_bytes ({sizes}); pass the "
                                 "same value on every rank")
        # phase 2: the board every rank mapped is one file (same host, same /dev/shm)
        same = ""
        if not reasons:
            joined = mods.load_acquire(base + 8)
            same = "" if joined == world else f"{joined} of {world} ranks share {board_path}"
        store.set(f"{key}/p2/{rank}", same)
        p2 = _gather_store(store, f"{key}/p2", world, to)
        _unlink(board_path)
        reasons += [(r, v) for r, v in enumerate(p2) if v]
        if not reasons:
            return cls(mods, keep, base, directory, token, rank, world, ring_bytes, abort)
        why = "; ".join(f"rank {r}: {w}" for r, w in reasons)
        if "shm" in modes:
            asked = [r for r, m in enumerate(modes) if m == "shm"]
            raise ShmUnavailable(f"rank(s) {asked} asked for the shared-memory transport but it "
                                 f"cannot run ({why}); use the process group's transport")
        log.info("shared-memory transport not used (%s): falling back on every rank", why)
        return None

    def _row(self, r: int) -> int:
        return self._base + _BOARD_HEADER + r * _ROW

    def _ring(self, src: int, dst: int) -> _Ring:
        path = os.path.join(self.directory, f"dualpipe-{self.token}-{src}-{dst}")
        keep, addr = _map(path, _RING_HEADER + self.ring_bytes, populate=True)
        if self._mods.fetch_add(addr + _OPENS, 1) == 1:  # both ends mapped: no name needed
            _unlink(path)
        return _Ring(path, keep, addr, self.ring_bytes, dst if src == self.rank else src)

    def _outbound(self, peer: int) -> _Ring:
        ring = self._out.get(peer)
        if ring is None:
            self._check_peer(peer)
            ring = self._out[peer] = self._ring(self.rank, peer)
            self._sendq[peer] = deque()
        return ring

    def _inbound_ring(self, peer: int) -> _Ring:
        ring = self._in.get(peer)
        if ring is None:
            self._check_peer(peer)
            ring = self._in[peer] = self._ring(peer, self.rank)
            self._inbound.append(ring)
        return ring

    def _check_usable(self, what: str, peer: int = -1) -> None:
        if self._broken is not None:
            raise PeerError(f"{what}: the shared-memory transport is unusable after an "
                            f"earlier error ({self._broken})", peer, what)
        if self._closed:
            raise PeerLost(f"{what}: the shared-memory transport is closed", peer, what)

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world or peer == self.rank:
            raise ValueError(f"peer must be another rank in 0..{self.world - 1}, got {peer}")

    # ------------------------------------------------------------------ operations
    def isend(self, tensors: Sequence[torch.Tensor], peer: int, what: str, tag: int = 0
              ) -> ShmHandle:
        self._check_usable(what, peer)
        ring = self._outbound(peer)
        ts = [_flat(t.detach(), what) for t in tensors]
        sizes = tuple(t.nbytes for t in ts)
        hdr = array.array("q", [tag, sum(sizes), _layout(sizes)])
        segs = [(hdr.buffer_info()[0], _HEADER)] + [(t.data_ptr(), n) for t, n in zip(ts, sizes)
                                                    if n]
        h = ShmHandle(self, list(tensors), what, peer)
        out = _Out(h, segs, (hdr, ts))
        q = self._sendq[peer]
        q.append(out)
        self._pending_sends += 1
        if len(q) == 1:
            self._push(ring, q)
        return h

    def irecv(self, buffers: Sequence[torch.Tensor], peer: int, what: str, tag: int = 0
              ) -> ShmHandle:
        self._check_usable(what, peer)
        ring = self._inbound_ring(peer)
        h = ShmHandle(self, list(buffers), what, peer)
        for b in buffers:
            if b.device.type != "cpu" or not b.is_contiguous():
                raise ValueError(f"{what}: the shared-memory transport receives into "
                                 f"contiguous CPU tensors, got {b.device} "
                                 f"{'contiguous' if b.is_contiguous() else 'strided'}")
        h.segs = [(b.data_ptr(), b.nbytes) for b in buffers if b.nbytes]
        h.nbytes = sum(b.nbytes for b in buffers)
        h.layout = _layout(tuple(b.nbytes for b in buffers))
        key = (peer, tag)
        early = self._unexpected.get(key)
        if early:
            self._fill(h, *early.popleft())
        elif ring.cur is not None and ring.cur.handle is None and ring.cur.tag == tag \
                and ring.cur.claim is None:
            ring.cur.claim = h  # the message arriving now is this one
        else:
            q = self._posted.get(key)
            if q is None:
                q = self._posted[key] = deque()
            q.append(h)
        return h

    def all_gather(self, t: torch.Tensor, world: int, what: str) -> ShmHandle:
        """Every rank's ``t`` (at most 256 bytes, CPU), in group-rank order."""
        if world != self.world:
            raise ValueError(f"{what}: all_gather over {world} ranks on a transport of "
                             f"{self.world}")
        if t.nbytes > _GATHER_BYTES or t.device.type != "cpu":
            raise ValueError(f"{what}: the shared-memory all_gather takes CPU tensors of at "
                             f"most {_GATHER_BYTES} bytes, got {t.nbytes} on {t.device}")
        self._check_usable(what)
        if self._gather is not None:
            raise RuntimeError(f"{what}: the previous all_gather "
                               f"({self._gather.what}) was never waited for")
        self._gathers += 1
        k = self._gathers
        src = _flat(t.detach(), what)
        slot = self._row(self.rank) + 64 + (k % 2) * 320
        self._bytes(slot + 64, src.nbytes).copy_(src.reshape(-1).view(torch.uint8))
        self._mods.store_release(slot + 8, src.nbytes)
        self._mods.store_release(slot, k)
        for r in range(self.world):
            if r != self.rank:
                self._mods.bell_ring(self._bells[r])
        h = ShmHandle(self, [torch.empty_like(t) for _ in range(world)], what, -1)
        h.seq = k
        self._gather = h
        self._check_gather()
        return h

    needs_poll = True  # a message larger than its ring moves only when someone drives it

    def poll(self) -> None:
        """Move what can move without waiting: queued sends into their rings, and data
        from rings whose writer waits for space.  The runtime calls it between compute
        actions, so a message larger than its ring keeps streaming while both ranks
        compute instead of only while one of them waits."""
        if self._closed or self._broken is not None:
            return
        self._push_queued()
        load = self._mods.load_acquire
        for ring in self._inbound:
            if load(ring.addr + _BLOCKED):
                self._pull(ring)

    def stop(self, message: str | None = None) -> bool:
        """Mark the pipeline stopped, which ends every rank's pending wait at once with
        :class:`PeerLost`.  The first rank to stop it is named, and its ``message`` (at
        most 4 KiB of text, e.g. why it stopped) is kept on the board for every rank to
        read (:meth:`stop_message`).  Returns True if this rank was the first.  Needs no
        other process: it works while any of them is stopped or dead."""
        if self._mods is None or self._stopped_here:
            return False
        self._stopped_here = True
        mods = self._mods
        first = mods.fetch_add(self._base + 24, 1) == 0
        if first:
            if message:
                data = message.encode()[: _STOP_MESSAGE]
                off = _BOARD_HEADER + self.world * _ROW
                self._board[1][off: off + len(data)].copy_(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8))
                mods.store_release(self._base + 32, len(data))
            mods.store_release(self._base + 16, self.rank + 1)
        for r in range(self.world):
            if r != self.rank:
                mods.bell_ring(self._bells[r])
        return first

    def stop_message(self, wait: float = 0.5) -> str | None:
        """The message of the rank that stopped the pipeline (:meth:`stop`), or ``None``
        if it is not stopped or its first stopper left none.  The first stopper writes
        the message before it raises the flag; a rank that stopped second waits up to
        ``wait`` s for the first one's message."""
        if self._mods is None:
            return None
        load = self._mods.load_acquire
        off = _BOARD_HEADER + self.world * _ROW
        end = time.monotonic() + wait
        while True:
            n = load(self._base + 32)
            if n:
                return bytes(self._board[1][off: off + n].numpy()).decode(errors="replace")
            if not load(self._base + 24):
                return None  # nobody stopped it
            if load(self._base + 16) and not load(self._base + 32):
                return None  # the flag follows the message: the first stopper left none
            if time.monotonic() >= end:
                return None
            time.sleep(0.001)

    def peer_state(self, r: int) -> str | None:
        """``"exited"`` (or closed its transport), ``"stopped"`` (SIGSTOP, a debugger),
        ``"alive"``, or ``None`` where processes cannot be seen (other pid namespaces)."""
        if self._mods is not None and self._mods.load_acquire(self._row(r) + 32):
            return "exited"
        if not self._liveness:
            return None
        try:
            st = _proc_stat(self._pids[r])
        except (OSError, ValueError, IndexError):
            return None
        if st is None or st[0] in (b"Z", b"X") or st[1] != self._starts[r]:
            return "exited"
        return "stopped" if st[0] in (b"T", b"t") else "alive"

    def close(self, failed: bool = False) -> None:
        """Release this rank's side.  ``failed=True`` stops the pipeline first
        (:meth:`stop`, unless this rank did already).  A normal close drops sends still
        queued (wait for their handles first); a peer waiting for this rank gets
        :class:`PeerLost` within ~50 ms; completed sends whose reader has not opened the
        ring yet stay readable."""
        if self._mods is None or self._closed:
            return
        mods = self._mods
        if failed:
            self.stop()
        else:
            mods.store_release(self._row(self.rank) + 32, 1)  # peers waiting on us stop
            for r in range(self.world):
                if r != self.rank:
                    mods.bell_ring(self._bells[r])
        self._closed = True
        _cleanup(self._patterns, self._out, self._mods, failed)
        self._sendq.clear()
        self._posted.clear()
        self._unexpected.clear()
        self._gather = None

    # ------------------------------------------------------------------ engine
    def _bytes(self, addr: int, n: int) -> torch.Tensor:
        off = addr - self._base
        return self._board[1][off: off + n]

    def _push(self, ring: _Ring, q: deque) -> None:
        """Write queued messages to ``ring`` and ring the reader if anything moved.  When
        the ring is full, flag it so the reader rings back once it frees space (then look
        once more: the reader may have freed it before seeing the flag)."""
        moved = self._write(ring, q)
        if q:
            self._mods.fetch_add(ring.addr + _BLOCKED, 1)
            moved = self._write(ring, q) or moved
        if moved:
            self._mods.bell_ring(self._bells[ring.peer])

    def _write(self, ring: _Ring, q: deque) -> bool:
        write = self._mods.ring_write
        moved = False
        while q:
            o = q[0]
            segs = o.segs
            while o.i < len(segs):
                addr, n = segs[o.i]
                if o.i == 0:
                    if not write(ring.addr, ring.cap, addr, n, 1):
                        break
                else:
                    w = write(ring.addr, ring.cap, addr + o.off, n - o.off, 0)
                    o.off += w
                    if o.off < n:
                        if w:
                            moved = True
                        break
                moved = True
                o.i += 1
                o.off = 0
            if o.i < len(segs):
                break
            q.popleft()
            o.handle.done = True
            o.keep = None
            self._pending_sends -= 1
        return moved

    def _pull(self, ring: _Ring) -> None:
        mods = self._mods
        read = mods.ring_read
        moved = False
        while True:
            cur = ring.cur
            if cur is None:
                if mods.ring_available(ring.addr) < _HEADER:
                    break
                read(ring.addr, ring.cap, ring.hdr_addr, _HEADER)
                moved = True
                tag, n, layout = ring.hdr
                q = self._posted.get((ring.peer, tag))
                h = q.popleft() if q else None
                if h is not None:
                    self._check_layout(h, n, layout)
                    cur = _In(tag, h, h.segs, None, layout)
                else:
                    stash = torch.empty(n, dtype=torch.uint8)
                    cur = _In(tag, None, [(stash.data_ptr(), n)] if n else [], stash, layout)
                ring.cur = cur
            segs = cur.segs
            while cur.i < len(segs):
                addr, n = segs[cur.i]
                got = read(ring.addr, ring.cap, addr + cur.off, n - cur.off)
                cur.off += got
                if got:
                    moved = True
                if cur.off < n:
                    break
                cur.i += 1
                cur.off = 0
            if cur.i < len(segs):
                break
            ring.cur = None
            if cur.handle is not None:
                cur.handle.done = True
            elif cur.claim is not None:
                self._fill(cur.claim, cur.stash, cur.layout)
            else:
                key = (ring.peer, cur.tag)
                q = self._unexpected.get(key)
                if q is None:
                    q = self._unexpected[key] = deque()
                q.append((cur.stash, cur.layout))
        if moved:  # space freed: wake the writer if it waits for space (seq_cst RMWs
            # on the flag order this check after our tail update, see _push)
            blocked = mods.fetch_add(ring.addr + _BLOCKED, 0)
            if blocked:
                mods.fetch_add(ring.addr + _BLOCKED, -blocked)
                mods.bell_ring(self._bells[ring.peer])

    def _check_gather(self) -> None:
        h = self._gather
        k = h.seq
        off = 64 + (k % 2) * 320
        load = self._mods.load_acquire
        for r in range(self.world):
            if load(self._row(r) + off) < k:
                return
        for r in range(self.world):
            out = h.tensors[r]
            n = load(self._row(r) + off + 8)
            if n != out.nbytes:
                self._broken = (f"{h.what}: rank {r} gathered {n} bytes, this rank "
                                f"{out.nbytes}")
                raise PeerError(f"{self._broken} (the ranks disagree on shapes or dtypes)",
                                r, h.what)
            out.view(-1).view(torch.uint8).copy_(self._bytes(self._row(r) + off + 64, n))
        h.done = True
        self._gather = None

    def _push_queued(self) -> None:
        if self._pending_sends:
            for peer, q in self._sendq.items():
                if q:
                    self._push(self._out[peer], q)

    def _progress(self) -> None:
        self._push_queued()
        for ring in self._inbound:
            self._pull(ring)
        if self._gather is not None:
            self._check_gather()

    def _wait(self, h: ShmHandle, timeout: datetime.timedelta, abort) -> None:
        self._check_usable(h.what, h.peer)
        try:
            self._wait_loop(h, timeout, abort)
        except BaseException as e:
            if h is self._gather and self._broken is None:
                # the ranks' gather counts no longer agree: later gathers cannot match
                self._broken = f"{h.what} failed: {e}"
            raise

    def _wait_loop(self, h: ShmHandle, timeout: datetime.timedelta, abort) -> None:
        mods = self._mods
        limit = timeout.total_seconds()
        start = time.monotonic()
        next_check = start + _CHECK_EVERY
        bell = self._bells[self.rank]
        while True:
            seen = mods.bell_value(bell)
            self._progress()
            if h.done:
                return
            stopped = mods.load_acquire(self._base + 16)
            if stopped:
                raise PeerLost(f"{h.what}: pipeline rank (group rank {stopped - 1}) stopped the "
                               "pipeline", stopped - 1, h.what)
            now = time.monotonic()
            if now - start >= limit:
                self._progress()
                if h.done:
                    return
                who = f"rank {h.peer}" if h.peer >= 0 else "some rank"
                raise PeerTimeout(f"{h.what}: {who} did not answer within {limit:g} s",
                                  h.peer, h.what)
            if now >= next_check:
                self._check_failures(h, abort)
                next_check = now + _CHECK_EVERY
            left = min(next_check, start + limit) - now
            mods.bell_wait(bell, seen, max(1, int(left * 1e6)))

    def _check_layout(self, h: ShmHandle, n: int, layout: int) -> None:
        if h.nbytes != n or h.layout != layout:
            what = (f"{n} bytes where {h.nbytes} were expected" if h.nbytes != n else
                    "tensors of other sizes than the receive's buffers")
            # the payload is not consumed: nothing after it can be read in order
            self._broken = f"{h.what}: rank {h.peer} sent {what}"
            raise PeerError(f"{self._broken} (the ranks disagree on shapes or dtypes)",
                            h.peer, h.what)

    def _fill(self, h: ShmHandle, stash: torch.Tensor, layout: int) -> None:
        """Complete receive ``h`` from a message that arrived before it was posted."""
        self._check_layout(h, stash.numel(), layout)
        off = 0
        for b in h.tensors:
            n = b.nbytes
            if n:
                b.view(-1).view(torch.uint8).copy_(stash[off: off + n])
            off += n
        h.done = True

    def _check_failures(self, h: ShmHandle, abort) -> None:
        for cb in (abort, self._abort_cb):
            if cb is not None:
                msg = cb()
                if msg is not None:
                    raise PeerAborted(msg, h.peer, h.what)
        peers = (h.peer,) if h.peer >= 0 else tuple(r for r in range(self.world) if r != self.rank)
        load = self._mods.load_acquire
        for r in peers:
            gone = None
            if load(self._row(r) + 32):
                gone = "closed the transport"
            elif self.peer_state(r) == "exited":
                gone = f"(pid {self._pids[r]}) exited"
            if gone is not None:
                self._progress()  # what it sent before going still counts
                if h.done:
                    return
                raise PeerExited(f"{h.what}: rank {r} {gone}", r, h.what)


def _flat(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"{what}: the shared-memory transport moves CPU tensors, got one on "
                         f"{t.device}")
    return t.resolve_conj().resolve_neg().contiguous()


def _layout(sizes: tuple) -> int:
    """A message's layout: a hash of its tensors' byte sizes (ints hash the same in every
    process), so a receive into differently split buffers is refused."""
    return hash(sizes) & 0x7FFFFFFFFFFFFFFF


def _gather_store(store, key: str, world: int, to: datetime.timedelta) -> list[str]:
    keys = [f"{key}/{r}" for r in range(world)]
    try:
        store.wait(keys, to)
    except Exception as e:  # noqa: BLE001 - the store's own timeout or connection error
        try:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
        except Exception:  # noqa: BLE001 - the store itself is gone
            missing = []
        raise _store_error(e, missing, to) from e
    return [store.get(k).decode() for k in keys]


def _store_error(e: Exception, missing: list[int], to: datetime.timedelta) -> PeerError:
    """The :class:`PeerError` for a failed store wait while setting up: a timeout names
    the group ranks that had not arrived (``missing``; empty: unknown)."""
    text = str(e).strip().splitlines()
    short = text[0][:200] if text else type(e).__name__
    who = (f"group rank(s) {missing} did not arrive" if missing else "not every rank arrived")
    peer = missing[0] if missing else -1
    what = "the ranks' agreement on a transport (ShmP2P.create)"
    if "imeout" in short or "imed out" in short:
        return PeerTimeout(f"{what}: {who} within {to.total_seconds():g} s ({short})", peer,
                           "transport setup")
    return PeerError(f"{what}: the store failed ({short})", peer, "transport setup")
