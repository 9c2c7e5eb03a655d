"""Per-rank functions for tests/test_shm.py (module level, so spawned ranks import them).

Every scenario builds its own :class:`overlap.shm.ShmP2P` (its own store prefix, so its own
token and files) and records what happened; the test compares against payloads rebuilt
from the same seeds (:func:`mixed_payload`, :func:`stream_payload`, :func:`gather_payload`).
A scenario that raises is recorded as an error and the next one still runs, so one broken
behaviour fails its own test, not the whole file.
"""
from __future__ import annotations

import datetime
import os
import signal
import time
import traceback

import torch

TO = datetime.timedelta(seconds=10)   # ordinary waits: generous, never reached when correct
SMALL_RING = 4096                     # the smallest ring create() accepts
RING = 1 << 16                        # the scenarios' usual ring (create() checks free space)


# ---------------------------------------------------------------- payloads (both sides)
def mixed_payload(seed: int) -> list[torch.Tensor]:
    """One multi-tensor message: several dtypes, a 0-dim, an empty and a strided tensor."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3, 5, generator=g),                                         # float32
        torch.randint(0, 256, (13,), generator=g, dtype=torch.uint8),           # odd size
        torch.randint(-2**62, 2**62, (7,), generator=g, dtype=torch.int64),     # int64
        torch.randn(4, 3, generator=g).to(torch.bfloat16),                      # bfloat16
        torch.randint(0, 2, (11,), generator=g).bool(),                         # bool
        torch.tensor(seed + 0.125, dtype=torch.float64),                        # 0-dim
        torch.empty(0, 4),                                                      # empty
        torch.randn(6, 4, generator=g).t(),                                     # strided (4, 6)
    ]


def stream_payload(seed: int) -> list[torch.Tensor]:
    """About 2 MB in two tensors whose sizes are not multiples of the 4096-byte ring."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(500_003, generator=g),
            torch.randint(-2**40, 2**40, (1_001,), generator=g, dtype=torch.int64)]


def small_payload(seed: int, n: int = 25) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g), torch.randint(-1000, 1000, (3,), generator=g)]


_GATHER_DTYPES = (torch.float64, torch.int32, torch.bfloat16, torch.uint8)


def gather_payload(rank: int, i: int) -> torch.Tensor:
    """Rank ``rank``'s all_gather input at iteration ``i``: dtype and size change every
    iteration (1 to 256 bytes), the same shape on every rank."""
    dtype = _GATHER_DTYPES[i % len(_GATHER_DTYPES)]
    item = torch.empty(0, dtype=dtype).element_size()
    n = 1 + (i * 37) % (256 // item)
    g = torch.Generator().manual_seed(10_000 * i + rank)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    hi = 256 if dtype == torch.uint8 else 2**31 - 1
    lo = 0 if dtype == torch.uint8 else -2**31
    return torch.randint(lo, hi, (n,), generator=g, dtype=dtype)


def garbage_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous receive buffer shaped like ``t``, every byte 0xA5."""
    b = torch.empty(t.shape, dtype=t.dtype)
    b.reshape(-1).view(torch.uint8).fill_(0xA5)
    return b


# ---------------------------------------------------------------- helpers
def _store():
    return torch.distributed.distributed_c10d._get_default_store()


def _make(store, prefix: str, rank: int, world: int, **kw):
    from overlap.shm import ShmP2P
    kw.setdefault("mode", "shm")
    kw.setdefault("timeout", 20.0)
    kw.setdefault("ring_bytes", RING)
    return ShmP2P.create(store, prefix, rank, world, **kw)


def _barrier(store, name: str, rank: int, world: int, timeout: float = 20.0) -> None:
    store.set(f"barrier/{name}/{rank}", "1")
    store.wait([f"barrier/{name}/{r}" for r in range(world)], datetime.timedelta(seconds=timeout))


def _outcome(fn) -> dict:
    """Run ``fn``; record its value or the exception (type, message, peer) and the time."""
    t0 = time.monotonic()
    try:
        value = fn()
        return {"kind": "ok", "value": value, "elapsed": time.monotonic() - t0,
                "wall": time.time()}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"kind": type(e).__name__, "msg": str(e), "peer": getattr(e, "peer", None),
                "elapsed": time.monotonic() - t0, "wall": time.time(),
                "tb": traceback.format_exc()}


def files_with(directory: str, token: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if token in f)


def _close(store, name: str, t, rank: int, world: int, **kw) -> list[str]:
    """Close ``t`` on every rank, then list its files while the object is still alive
    (so close() itself, not garbage collection, must have removed them)."""
    t.close(**kw)
    _barrier(store, f"{name}/closed", rank, world)
    return files_with(t.directory, t.token)


def _where(store, prefix: str) -> tuple[str, str]:
    """(directory, token) create() agreed on for ``prefix`` (also when it returned None)."""
    # the first create() on a prefix agrees under generation 1
    directory, token = store.get(f"{prefix}/shm/1/where").decode().split("\n")
    return directory, token


# ---------------------------------------------------------------- 2-rank scenarios
def sc_mixed(store, rank, world):
    """Both directions at once, one multi-tensor message of mixed dtypes each way."""
    from overlap.shm import DEFAULT_RING_BYTES
    t = _make(store, "mixed", rank, world, ring_bytes=DEFAULT_RING_BYTES)
    peer = 1 - rank
    recv = [garbage_like(x) for x in mixed_payload(100 + peer)]
    hs = t.isend(mixed_payload(100 + rank), peer, "mixed", tag=1)
    hr = t.irecv(recv, peer, "mixed", tag=1)
    got = hr.wait(TO)
    hs.wait(TO)
    _barrier(store, "mixed/exchanged", rank, world)
    files_open = files_with(t.directory, t.token)   # both ends mapped both rings: unlinked
    return {"got": got, "same_objects": all(a is b for a, b in zip(got, recv)),
            "files_while_open": files_open, "where": (t.directory, t.token),
            "files_closed": _close(store, "mixed", t, rank, world)}


def sc_stream(store, rank, world):
    """Three ~2 MB messages through a 4096-byte ring, queued before the receiver reads."""
    t = _make(store, "stream", rank, world, ring_bytes=SMALL_RING)
    out = {"where": (t.directory, t.token)}
    if rank == 0:
        t0 = time.monotonic()
        hs = [t.isend(stream_payload(200 + i), 1, f"big{i}", tag=3) for i in range(3)]
        out["isend_s"] = time.monotonic() - t0
        out["done_after_isend"] = [h.is_completed() for h in hs]
        store.set("stream/sent", "1")        # the receiver posts its receives only now
        ack = torch.zeros(1, dtype=torch.int64)
        t.irecv([ack], 1, "ack", tag=9).wait(TO)   # waiting on something else streams the sends
        out["ack"] = int(ack)
        out["done_after_ack"] = [h.is_completed() for h in hs]
        for h in hs:
            h.wait(TO)
    else:
        store.wait(["stream/sent"], TO)
        bufs = [[garbage_like(x) for x in stream_payload(200 + i)] for i in range(3)]
        hs = [t.irecv(b, 0, f"big{i}", tag=3) for i, b in enumerate(bufs)]
        out["got"] = [h.wait(TO) for h in hs]
        t.isend([torch.tensor([4242])], 0, "ack", tag=9).wait(TO)
    _barrier(store, "stream/end", rank, world)
    out["files_closed"] = _close(store, "stream", t, rank, world)
    return out


def sc_order(store, rank, world):
    """Matching by tag when receives are posted out of order, and FIFO within a tag."""
    t = _make(store, "order", rank, world, ring_bytes=SMALL_RING)
    out = {"where": (t.directory, t.token)}
    if rank == 0:
        # (a) tag 5 is ~64 KB (streams through the 4 KB ring), tag 6 small
        s = [t.isend(small_payload(501, 16_001), 1, "t5", tag=5),
             t.isend(small_payload(601), 1, "t6", tag=6)]
        store.set("order/a", "1")
        for h in s:
            h.wait(TO)
        # (b) both small: entirely in the ring before the receiver looks
        s = [t.isend(small_payload(502), 1, "t5", tag=5),
             t.isend(small_payload(602), 1, "t6", tag=6)]
        store.set("order/b", "1")
        for h in s:
            h.wait(TO)
        # (c) FIFO of messages that arrive before their receives: three tag 7, then tag 8
        s = [t.isend(small_payload(700 + i, 300), 1, f"t7-{i}", tag=7) for i in range(3)]
        s.append(t.isend(small_payload(800), 1, "t8", tag=8))
        for h in s:
            h.wait(TO)
        # (d) FIFO of receives posted before their messages (~12 KB each: streamed)
        store.wait(["order/d-posted"], TO)
        s = [t.isend(small_payload(900 + i, 3_000), 1, f"t9-{i}", tag=9) for i in range(3)]
        for h in s:
            h.wait(TO)
        # (e) one receive posted early, two late (one stashed, one maybe mid-stream)
        store.wait(["order/e-posted"], TO)
        s = [t.isend(small_payload(1000 + i, 2_000), 1, f"t10-{i}", tag=10) for i in range(3)]
        for h in s:
            h.wait(TO)
    else:
        store.wait(["order/a"], TO)
        time.sleep(0.05)
        a6 = [garbage_like(x) for x in small_payload(601)]
        a5 = [garbage_like(x) for x in small_payload(501, 16_001)]
        h6 = t.irecv(a6, 0, "t6", tag=6)
        out["a_t6_done_early"] = h6.is_completed()   # tag 5 is in the way, partly read
        h5 = t.irecv(a5, 0, "t5", tag=5)
        out["a"] = {5: h5.wait(TO), 6: h6.wait(TO)}
        store.wait(["order/b"], TO)
        time.sleep(0.05)
        b6 = t.irecv([garbage_like(x) for x in small_payload(602)], 0, "t6", tag=6).wait(TO)
        b5 = t.irecv([garbage_like(x) for x in small_payload(502)], 0, "t5", tag=5).wait(TO)
        out["b"] = {5: b5, 6: b6}
        c8 = t.irecv([garbage_like(x) for x in small_payload(800)], 0, "t8", tag=8).wait(TO)
        c7 = [t.irecv([garbage_like(x) for x in small_payload(700, 300)], 0, "t7", tag=7)
              for _ in range(3)]
        out["c"] = {"t8": c8, "t7": [h.wait(TO) for h in c7]}
        d = [t.irecv([garbage_like(x) for x in small_payload(900, 3_000)], 0, "t9", tag=9)
             for _ in range(3)]
        store.set("order/d-posted", "1")
        out["d"] = [h.wait(TO) for h in d]
        e0 = t.irecv([garbage_like(x) for x in small_payload(1000, 2_000)], 0, "t10", tag=10)
        store.set("order/e-posted", "1")
        got0 = e0.wait(TO)
        time.sleep(0.05)
        rest = [t.irecv([garbage_like(x) for x in small_payload(1000, 2_000)], 0, "t10", tag=10)
                for _ in range(2)]
        out["e"] = [got0] + [h.wait(TO) for h in rest]
    _barrier(store, "order/end", rank, world)
    out["files_closed"] = _close(store, "order", t, rank, world)
    return out


def sc_mismatch(store, rank, world):
    """A receive of the wrong size: posted before the message, and after it arrived."""
    out = {}
    t = _make(store, "mm1", rank, world)
    w1 = (t.directory, t.token)
    if rank == 0:
        store.wait(["mm1/posted"], TO)
        t.isend([torch.arange(10, dtype=torch.float32)], 1, "mm", tag=0).wait(TO)
    else:
        h = t.irecv([torch.empty(9)], 0, "mm-posted", tag=0)
        store.set("mm1/posted", "1")
        out["posted_first"] = _outcome(lambda: h.wait(TO))
    _barrier(store, "mm1/end", rank, world)
    files_mm1 = _close(store, "mm1", t, rank, world)
    t = _make(store, "mm2", rank, world)
    if rank == 0:
        t.isend([torch.arange(10, dtype=torch.float32)], 1, "mm", tag=2).wait(TO)
        t.isend([torch.ones(1)], 1, "ok", tag=3).wait(TO)
        store.set("mm2/sent", "1")
    else:
        store.wait(["mm2/sent"], TO)
        out["other_tag"] = _outcome(lambda: t.irecv([torch.empty(1)], 0, "ok", tag=3).wait(TO))
        out["arrived_first"] = _outcome(
            lambda: t.irecv([torch.empty(9)], 0, "mm-late", tag=2).wait(TO))
    _barrier(store, "mm2/end", rank, world)
    out["files_closed"] = files_mm1 + _close(store, "mm2", t, rank, world)
    out["where"] = [w1, (t.directory, t.token)]
    return out


def sc_timeout(store, rank, world):
    """Nobody sends (rank 1 is alive, just busy): PeerTimeout after the timeout; a send
    that cannot drain (ring full, nobody reads) times out the same way."""
    t = _make(store, "timeout", rank, world, ring_bytes=SMALL_RING)
    out = {"where": (t.directory, t.token)}
    if rank == 0:
        out["recv"] = _outcome(lambda: t.irecv([torch.empty(4)], 1, "nothing", tag=0).wait(
            datetime.timedelta(seconds=0.5)))
        out["send"] = _outcome(lambda: t.isend([torch.zeros(20_000)], 1, "undrained", tag=0).wait(
            datetime.timedelta(seconds=0.3)))
        store.set("timeout/done", "1")
    else:
        store.wait(["timeout/done"], TO)
    out["files_closed"] = _close(store, "timeout", t, rank, world)   # rank 0 made the rings
    return out


def sc_stop(store, rank, world):
    """close(failed=True) on rank 1 ends rank 0's pending wait (30 s timeout) at once."""
    t = _make(store, "stop", rank, world)
    out = {"where": (t.directory, t.token)}
    if rank == 0:
        h = t.irecv([torch.empty(4)], 1, "never-sent", tag=0)
        store.set("stop/waiting", "1")
        out["wait"] = _outcome(lambda: h.wait(datetime.timedelta(seconds=30)))
        out["files_closed"] = _close(store, "stop", t, rank, world)
    else:
        store.wait(["stop/waiting"], TO)
        time.sleep(0.2)
        out["closed_at"] = time.time()
        out["files_closed"] = _close(store, "stop", t, rank, world, failed=True)
        out["send_after_close"] = _outcome(lambda: t.isend([torch.ones(1)], 0, "late", tag=0))
    return out


def _abort_after(delay: float, msg: str):
    start = []

    def cb():
        if not start:
            start.append(time.monotonic())
        return msg if time.monotonic() - start[0] >= delay else None
    return cb


ABORT_MSG = "rank 7 reported a failure: boom"
ABORT_MSG_CREATE = "the runtime's failure record: rank 3 raised"


def sc_abort(store, rank, world):
    """The wait's ``abort`` callback, and the transport's own (given to create())."""
    out = {}
    t = _make(store, "abort", rank, world)
    cb = _abort_after(0.2, ABORT_MSG_CREATE) if rank == 0 else None
    t2 = _make(store, "abort2", rank, world, abort=cb)
    out["where"] = [(t.directory, t.token), (t2.directory, t2.token)]
    if rank == 0:
        out["wait_cb"] = _outcome(lambda: t.irecv([torch.empty(2)], 1, "never", tag=0).wait(
            datetime.timedelta(seconds=30), abort=_abort_after(0.2, ABORT_MSG)))
        out["create_cb"] = _outcome(lambda: t2.irecv([torch.empty(2)], 1, "never", tag=0).wait(
            datetime.timedelta(seconds=30)))
        store.set("abort/done", "1")
    else:
        store.wait(["abort/done"], TO)
    out["files_closed"] = _close(store, "abort", t, rank, world) + \
        _close(store, "abort2", t2, rank, world)
    return out


def sc_create(store, rank, world):
    """create() agreement: every rank gets the same answer whatever it asked for."""
    from overlap.shm import ShmP2P
    out = {}
    cases = {"c_off_auto": ("off", "auto"), "c_auto_off": ("auto", "off"),
             "c_shm_off": ("shm", "off"), "c_shm_shm": ("shm", "shm")}
    for name, modes in cases.items():
        def go():
            t = ShmP2P.create(store, name, rank, world, mode=modes[rank], timeout=20.0)
            if t is None:
                return None
            t.close()
            return type(t).__name__
        out[name] = _outcome(go)
        _barrier(store, f"{name}/end", rank, world)
        out[name]["where"] = _where(store, name)
    return out


def sc_ring_disagree(store, rank, world):
    """The ranks pass different ring_bytes to create() (4096 on rank 0, 8192 on rank 1).
    Acceptable: create() refuses on every rank, or the data arrives intact."""
    made = _outcome(lambda: _make(store, "ringdis", rank, world,
                                  ring_bytes=SMALL_RING if rank == 0 else 2 * SMALL_RING))
    out = {"create": {k: v for k, v in made.items() if k != "value"}}
    t = made.get("value")
    if t is None:
        return out
    out["where"] = (t.directory, t.token)
    x = stream_payload(300)[1]            # 8 KB: wraps the smaller ring
    if rank == 0:
        out["send"] = _outcome(lambda: t.isend([x], 1, "x", tag=0).wait(TO))
    else:
        out["recv"] = _outcome(lambda: t.irecv([garbage_like(x)], 0, "x", tag=0).wait(TO))
    out["files_closed"] = _close(store, "ringdis", t, rank, world)
    return out


def sc_sent_then_closed(store, rank, world):
    """Rank 0's send completes (its bytes are in the ring), then rank 0 closes normally;
    rank 1 posts its first receive from rank 0 only afterwards (rank 0 still runs)."""
    t = _make(store, "stc", rank, world, ring_bytes=SMALL_RING)
    out = {"where": (t.directory, t.token)}
    if rank == 0:
        out["send"] = _outcome(lambda: t.isend(small_payload(1100), 1, "last", tag=0).wait(TO))
        out["files_closed"] = _close(store, "stc", t, rank, world)
        store.wait(["stc/received"], TO)
    else:
        _barrier(store, "stc/closed", rank, world)   # rank 0 has closed
        out["files_closed"] = files_with(t.directory, t.token)
        out["recv"] = _outcome(lambda: t.irecv([garbage_like(x) for x in small_payload(1100)],
                                                0, "last", tag=0).wait(
            datetime.timedelta(seconds=0.5)))
        store.set("stc/received", "1")
        t.close()
    return out


def sc_review(store, rank, world):
    """Findings of the review: a layout mismatch (same bytes, other split) is refused and
    leaves the transport unusable; gathers of different sizes are refused; conjugated
    tensors arrive resolved; a peer that closes normally is noticed; the stop flag names
    the first rank that stopped."""
    out = {}
    t = _make(store, "rev1", rank, world)
    out["where"] = [(t.directory, t.token)]
    a, b = torch.arange(2.0), torch.arange(10.0, 14.0)
    if rank == 0:
        t.isend([a, b], 1, "split", tag=1).wait(TO)
        z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
        t.isend([z.conj()], 1, "conj", tag=2).wait(TO)
    else:
        out["conj"] = _outcome(lambda: t.irecv([torch.empty(2, dtype=torch.complex64)], 0,
                                               "conj", tag=2).wait(TO))
        out["layout"] = _outcome(lambda: t.irecv([torch.empty(4), torch.empty(2)], 0,
                                                 "split", tag=1).wait(TO))
        out["after"] = _outcome(lambda: t.irecv([torch.empty(1)], 0, "next", tag=3))
    _barrier(store, "rev1/done", rank, world)
    t.close()
    t = _make(store, "rev2", rank, world)
    out["where"].append((t.directory, t.token))
    out["gather"] = _outcome(lambda: t.all_gather(torch.zeros(2 + 3 * rank), world,
                                                  "uneven").wait(TO))
    _barrier(store, "rev2/done", rank, world)
    t.close()
    t = _make(store, "rev3", rank, world)
    out["where"].append((t.directory, t.token))
    if rank == 0:
        out["peer_closed"] = _outcome(lambda: t.irecv([torch.empty(1)], 1, "never", tag=0)
                                      .wait(datetime.timedelta(seconds=30)))
    else:
        time.sleep(0.2)
        t.close()
    _barrier(store, "rev3/done", rank, world)
    t.close()
    t = _make(store, "rev4", rank, world)
    out["where"].append((t.directory, t.token))
    if rank == 1:
        t.close(failed=True)
    _barrier(store, "rev4/first", rank, world)
    if rank == 0:
        t.close(failed=True)
        out["stopped_by"] = t._mods.load_acquire(t._base + 16) - 1
    return out


SCENARIOS = ("mixed", "stream", "order", "mismatch", "timeout", "stop", "abort", "create",
             "ring_disagree", "sent_then_closed", "review")


def suite(rank: int, world: int) -> dict:
    """Every 2-rank scenario in turn (one process launch for all of them)."""
    store = _store()
    out = {}
    for name in SCENARIOS:
        _barrier(store, f"start/{name}", rank, world, timeout=60.0)
        out[name] = _outcome(lambda: globals()[f"sc_{name}"](store, rank, world))
    _barrier(store, "suite/end", rank, world, timeout=60.0)
    # files of every transport, after every rank closed it (the processes still run)
    wheres = []
    for name in SCENARIOS:
        v = out[name].get("value")
        if isinstance(v, dict):
            w = v.get("where")
            if w is not None:
                wheres += w if isinstance(w, list) else [w]
            if name == "create":
                wheres += [c["where"] for c in v.values()]
    out["files_after_close"] = {tok: files_with(d, tok) for d, tok in wheres if tok}
    return out


# ---------------------------------------------------------------- 3-rank run
def gather_and_kill(rank: int, world: int) -> dict:
    """50 all_gathers with changing payloads, the size limit, then rank 2 is SIGKILLed
    while ranks 0 and 1 wait on it (30 s timeout)."""
    store = _store()
    out = {}
    t = _make(store, "gather", rank, world)
    rows = []
    for i in range(50):
        if i % 10 == 3 and rank == i % 3:
            time.sleep(0.01)   # one rank late now and then: the others sleep on the bell
        rows.append(t.all_gather(gather_payload(rank, i), world, f"gather {i}").wait(TO))
    out["rows"] = rows
    out["max"] = _outcome(lambda: t.all_gather(torch.full((256,), rank, dtype=torch.uint8), world,
                                               "256 bytes").wait(TO))
    out["too_big"] = _outcome(lambda: t.all_gather(torch.zeros(257, dtype=torch.uint8), world,
                                                   "257 bytes"))
    out["after_too_big"] = _outcome(lambda: t.all_gather(gather_payload(rank, 50), world,
                                                         "after").wait(TO))
    out["gather_where"] = (t.directory, t.token)
    _barrier(store, "gather/end", rank, world)
    t.close()

    a = _make(store, "killA", rank, world)
    b = _make(store, "killB", rank, world)
    out["where_a"], out["where_b"] = (a.directory, a.token), (b.directory, b.token)
    if rank == 2:
        # a message on b that rank 1 never receives: only this process maps that ring
        b.isend([torch.arange(10)], 1, "orphan", tag=0).wait(TO)
        store.set("kill/at", repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)   # not reached
    h = a.irecv([torch.empty(3)], 2, "from the killed rank", tag=0)
    out["killed"] = _outcome(lambda: h.wait(datetime.timedelta(seconds=30)))
    out["killed_at"] = float(store.get("kill/at"))
    a.close()
    b.close()
    _barrier(store, "kill/closed", rank, 2)   # ranks 0 and 1
    out["files_a"] = files_with(a.directory, a.token)
    out["files_b"] = files_with(b.directory, b.token)
    return out


# ---------------------------------------------------------------- RSS of a pipeline
def rss_shmem_kib() -> int:
    """Shared-memory pages mapped into this process (``RssShmem``, KiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem"))


def pipeline_rss(rank: int, world: int, steps: int, marks: list[int]) -> dict:
    """A DualPipeV pipeline on the shared-memory transport: RssShmem after each step in
    ``marks`` (and before the first)."""
    from tests.models import criterion, make_batch
    from tests.workers import build, rank_io
    p, s = build("dualpipev", rank, world, 2 * world, timeout=60, transport="shm")
    out = {"transport": p.transport, 0: rss_shmem_kib()}
    for i in range(1, steps + 1):
        xs, ys = make_batch(i, 2 * world, False)
        inputs, labels, _ = rank_io(s, rank, xs, ys)
        p.step(*inputs, num_chunks=2 * world, criterion=criterion if labels else None,
               labels=labels)
        if i in marks:
            out[i] = rss_shmem_kib()
    p.close()
    return out
