"""overlap.shm: the extension's ring/bell primitives, and ShmP2P between real processes.

The multi-process cases run in two launches (2 ranks: :func:`tests.shm_workers.suite`,
every scenario in turn; 3 ranks: :func:`tests.shm_workers.gather_and_kill`), shared by
the tests below through module fixtures, because starting ranks costs seconds each.
Received tensors are compared byte for byte with payloads rebuilt from the same seeds.
"""
from __future__ import annotations

import mmap
import os
import threading
import time

import pytest
import torch

from overlap._ext import load_extension
from overlap.shm import ShmP2P
from tests import shm_workers as sw
from tests.mp import run_ranks

_C = load_extension()
if _C is None or not hasattr(_C, "ring_write"):
    pytest.skip("overlap._C is missing or predates the shared-memory primitives (ring_write); "
                "rebuild it with `pip install --no-build-isolation -e .`",
                allow_module_level=True)
if not _C.shm_supported():
    pytest.skip("overlap._C.shm_supported() is False: no futexes on this platform (Linux only)",
                allow_module_level=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got, want, what=""):
    """Same dtype, same shape, same bytes (so -0.0, NaN payloads, bf16 bits all count)."""
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i, g.dtype, g.shape, w.shape)
        assert g.is_contiguous(), (what, i)
        assert torch.equal(bits(g), bits(w)), (what, i)


def ok(o: dict, what: str = ""):
    assert o["kind"] == "ok", f"{what}: {o.get('kind')}: {o.get('msg')}\n{o.get('tb', '')}"
    return o["value"]


# ================================================================ primitives, one process
CAP = 60  # not a power of two: the ring must not rely on masking


@pytest.fixture
def region():
    mm = mmap.mmap(-1, 4096)   # anonymous MAP_SHARED
    buf = torch.frombuffer(mm, dtype=torch.uint8)
    yield buf, buf.data_ptr()
    del buf


def _ring_data(buf):
    return buf[128:128 + CAP]   # data follows the 128-byte header (head @0, tail @64)


def test_ring_roundtrip_and_wraparound(region):
    buf, ring = region
    data = _ring_data(buf)
    assert _C.ring_available(ring) == 0
    src = (torch.arange(200) * 7 + 3).to(torch.uint8)
    dst = torch.zeros(200, dtype=torch.uint8)
    assert _C.ring_write(ring, CAP, src.data_ptr(), 40, 0) == 40
    assert _C.ring_available(ring) == 40
    assert torch.equal(data[:40], src[:40])
    assert _C.ring_read(ring, CAP, dst.data_ptr(), 40) == 40
    assert torch.equal(dst[:40], src[:40])
    assert _C.ring_available(ring) == 0
    # 50 bytes at offset 40 of 60: 20 at the end, 30 wrapped to the start
    src2 = (torch.arange(50) * 5 + 11).to(torch.uint8)
    assert _C.ring_write(ring, CAP, src2.data_ptr(), 50, 1) == 50
    assert torch.equal(data[40:60], src2[:20]) and torch.equal(data[:30], src2[20:])
    assert _C.ring_available(ring) == 50
    # read it back in two pieces, the first ending past the boundary
    assert _C.ring_read(ring, CAP, dst.data_ptr(), 27) == 27
    assert _C.ring_read(ring, CAP, dst.data_ptr() + 27, 23) == 23
    assert torch.equal(dst[:50], src2)
    # a write that ends exactly at the boundary, then one that starts at offset 0
    # (head = tail = 90, offset 30: 30 bytes fill to the end)
    src3 = (torch.arange(45) + 100).to(torch.uint8)
    assert _C.ring_write(ring, CAP, src3.data_ptr(), 30, 1) == 30
    assert _C.ring_write(ring, CAP, src3.data_ptr() + 30, 15, 1) == 15
    assert torch.equal(data[30:60], src3[:30]) and torch.equal(data[:15], src3[30:])
    assert _C.ring_read(ring, CAP, dst.data_ptr(), 200) == 45   # asks more than there is
    assert torch.equal(dst[:45], src3)
    # the counters are totals: head @0 (bytes written), tail @64 (bytes read)
    assert _C.load_acquire(ring) == 135 and _C.load_acquire(ring + 64) == 135
    # empty ring: reads nothing, leaves dst alone
    dst.fill_(0xEE)
    assert _C.ring_read(ring, CAP, dst.data_ptr(), 10) == 0
    assert bool((dst == 0xEE).all())


def test_ring_full_partial_and_all_or_nothing(region):
    buf, ring = region
    data = _ring_data(buf)
    big = (torch.arange(100) + 1).to(torch.uint8)
    dst = torch.zeros(100, dtype=torch.uint8)
    # 100 bytes do not fit in 60: all_or_nothing writes nothing at all
    assert _C.ring_write(ring, CAP, big.data_ptr(), 100, 1) == 0
    assert _C.ring_available(ring) == 0 and _C.load_acquire(ring) == 0
    assert bool((data == 0).all())
    # without it, as much as fits
    assert _C.ring_write(ring, CAP, big.data_ptr(), 100, 0) == CAP
    assert _C.ring_available(ring) == CAP
    assert torch.equal(data, big[:CAP])
    # full ring: 0 either way
    assert _C.ring_write(ring, CAP, big.data_ptr(), 1, 0) == 0
    assert _C.ring_write(ring, CAP, big.data_ptr(), 1, 1) == 0
    assert _C.ring_available(ring) == CAP
    # free 25: a 26-byte all_or_nothing write is refused whole, a plain one takes 25
    assert _C.ring_read(ring, CAP, dst.data_ptr(), 25) == 25
    assert torch.equal(dst[:25], big[:25])
    other = (torch.arange(40) + 200).to(torch.uint8)
    assert _C.ring_write(ring, CAP, other.data_ptr(), 26, 1) == 0
    assert _C.ring_available(ring) == CAP - 25 and _C.load_acquire(ring) == CAP
    assert _C.ring_write(ring, CAP, other.data_ptr(), 26, 0) == 25
    assert _C.ring_available(ring) == CAP
    assert _C.ring_read(ring, CAP, dst.data_ptr(), 100) == CAP
    assert torch.equal(dst[:CAP - 25], big[25:CAP]) and torch.equal(dst[CAP - 25:CAP], other[:25])
    assert _C.ring_available(ring) == 0


def test_atomics(region):
    buf, base = region
    a = base + 1024
    _C.store_release(a, 5)
    assert _C.load_acquire(a) == 5
    assert int(buf[1024:1032].view(torch.int64)) == 5
    assert _C.fetch_add(a, 3) == 5 and _C.load_acquire(a) == 8
    assert _C.fetch_add(a, -8) == 8 and _C.load_acquire(a) == 0


def test_bell_wait_timeout_immediate_and_wakeup(region):
    buf, base = region
    bell = base + 2048          # 32-bit word, sleeper count right after it
    sleepers = buf[2052:2056].view(torch.int32)
    assert _C.bell_value(bell) == 0
    t0 = time.monotonic()
    assert _C.bell_wait(bell, 0, 200_000) is False      # nobody rings: times out
    el = time.monotonic() - t0
    assert 0.15 <= el < 1.5, el
    assert int(sleepers) == 0
    _C.bell_ring(bell)
    assert _C.bell_value(bell) == 1
    t0 = time.monotonic()
    assert _C.bell_wait(bell, 0, 5_000_000) is True     # already moved off `seen`
    assert time.monotonic() - t0 < 0.5                  # not the 5 s timeout
    assert _C.bell_wait(bell, 1, 0) is False            # no timeout: just a check
    # rung from another thread while we sleep (bell_wait releases the GIL)
    timer = threading.Timer(0.1, _C.bell_ring, args=(bell,))
    timer.start()
    t0 = time.monotonic()
    assert _C.bell_wait(bell, 1, 5_000_000) is True
    el = time.monotonic() - t0
    timer.join()
    assert el < 2.0, el
    assert _C.bell_value(bell) == 2 and int(sleepers) == 0


# ================================================================ create() argument checks
def test_create_rejects_bad_arguments():
    """A usage error is published through the store (so the other ranks raise too instead
    of waiting out their timeout) and raised as ValueError; a 1-rank group here."""
    import torch.distributed as dist
    store = dist.HashStore()
    with pytest.raises(ValueError, match="rank 0: .*'auto', 'shm' or 'off'"):
        ShmP2P.create(store, "x", 0, 1, mode="fast", timeout=5)
    with pytest.raises(ValueError, match="rank 0: ring_bytes must be at least 4096"):
        ShmP2P.create(store, "x", 0, 1, ring_bytes=4095, timeout=5)
    # the same prefix again is a new agreement, not the old keys
    t = ShmP2P.create(store, "x", 0, 1, timeout=5)
    assert t is not None
    t.close()


# ================================================================ 2 ranks
@pytest.fixture(scope="module")
def suite():
    res = run_ranks(sw.suite, 2, timeout=120)
    yield res
    # leave nothing behind in the ring directory whatever happened
    _remove_files([tok for r in res for tok in r.get("files_after_close", {})])


def _remove_files(tokens):
    for tok in tokens:
        for d in ("/dev/shm", "/tmp"):
            if os.path.isdir(d):
                for f in sw.files_with(d, tok):
                    try:
                        os.unlink(os.path.join(d, f))
                    except OSError:
                        pass


def _scenario(suite, name):
    return [ok(r[name], f"rank {rank} scenario {name}") for rank, r in enumerate(suite)]


def test_mixed_dtypes_both_directions(suite):
    for rank, v in enumerate(_scenario(suite, "mixed")):
        # rank r received the payload of its peer, as contiguous tensors
        want = [w.contiguous() for w in sw.mixed_payload(100 + (1 - rank))]
        assert_same(v["got"], want, f"rank {rank}")
        assert v["same_objects"], "wait() must return the posted buffers themselves"
        # once both ends mapped both rings, their names are gone from the directory
        assert v["files_while_open"] == [], v["files_while_open"]


def test_streaming_through_a_small_ring(suite):
    s0, s1 = _scenario(suite, "stream")
    # isend returned at once, before the receiver read anything (it waited for our key)
    assert s0["done_after_isend"] == [False, False, False]
    assert s0["isend_s"] < 1.0, s0["isend_s"]
    # waiting on an unrelated receive streamed all three sends through the 4 KB ring
    assert s0["ack"] == 4242
    assert s0["done_after_ack"] == [True, True, True]
    assert len(s1["got"]) == 3
    for i, got in enumerate(s1["got"]):
        assert_same(got, sw.stream_payload(200 + i), f"message {i}")


def test_out_of_order_posting_and_fifo_per_tag(suite):
    _, v = _scenario(suite, "order")
    # (a) tag 6 posted first while tag 5 (64 KB) was still streaming in
    assert v["a_t6_done_early"] is False
    assert_same(v["a"][5], sw.small_payload(501, 16_001), "a tag 5")
    assert_same(v["a"][6], sw.small_payload(601), "a tag 6")
    # (b) both already in the ring, received in the opposite order
    assert_same(v["b"][5], sw.small_payload(502), "b tag 5")
    assert_same(v["b"][6], sw.small_payload(602), "b tag 6")
    # (c) three tag-7 messages kept aside while tag 8 was received: in order
    assert_same(v["c"]["t8"], sw.small_payload(800), "c tag 8")
    for i, got in enumerate(v["c"]["t7"]):
        assert_same(got, sw.small_payload(700 + i, 300), f"c tag 7 #{i}")
    # (d) three receives posted before their messages: in order
    for i, got in enumerate(v["d"]):
        assert_same(got, sw.small_payload(900 + i, 3_000), f"d tag 9 #{i}")
    # (e) one posted early, two late
    for i, got in enumerate(v["e"]):
        assert_same(got, sw.small_payload(1000 + i, 2_000), f"e tag 10 #{i}")


def _assert_size_error(o, what):
    assert o["kind"] == "PeerError", (what, o)
    assert "bytes" in o["msg"] and "40" in o["msg"] and "36" in o["msg"], (what, o["msg"])
    assert o["peer"] == 0, (what, o)


def test_size_mismatch_is_a_peer_error(suite):
    _, v = _scenario(suite, "mismatch")
    _assert_size_error(v["posted_first"], "receive posted before the message")
    ok(v["other_tag"], "the message behind it")
    _assert_size_error(v["arrived_first"], "receive posted after the message arrived")


def test_timeout_names_the_peer(suite):
    v, _ = _scenario(suite, "timeout")
    for key, limit in (("recv", 0.5), ("send", 0.3)):
        o = v[key]
        assert o["kind"] == "PeerTimeout", (key, o)
        assert "rank 1" in o["msg"] and o["peer"] == 1, (key, o["msg"])
        assert limit - 0.01 <= o["elapsed"] < limit + 1.0, (key, o["elapsed"])


def test_close_failed_stops_the_peer_at_once(suite):
    v0, v1 = _scenario(suite, "stop")
    o = v0["wait"]
    assert o["kind"] == "PeerLost", o
    assert "rank 1" in o["msg"] or "group rank 1" in o["msg"], o["msg"]
    latency = o["wall"] - v1["closed_at"]
    assert latency < 1.0, latency
    assert o["elapsed"] < 5.0, o["elapsed"]   # the timeout was 30 s
    assert v1["send_after_close"]["kind"] == "PeerLost", v1["send_after_close"]


def test_abort_callbacks(suite):
    v, _ = _scenario(suite, "abort")
    for key, msg in (("wait_cb", sw.ABORT_MSG), ("create_cb", sw.ABORT_MSG_CREATE)):
        o = v[key]
        assert o["kind"] == "PeerAborted", (key, o)
        assert o["msg"] == msg, (key, o["msg"])
        assert 0.2 <= o["elapsed"] < 1.5, (key, o["elapsed"])


def test_create_agreement(suite):
    res = [r["create"] for r in suite]
    for rank, v in enumerate(_scenario(suite, "create")):
        assert v["c_off_auto"]["kind"] == "ok" and v["c_off_auto"]["value"] is None, v["c_off_auto"]
        assert v["c_auto_off"]["kind"] == "ok" and v["c_auto_off"]["value"] is None, v["c_auto_off"]
        o = v["c_shm_off"]
        assert o["kind"] == "ShmUnavailable", (rank, o)
        assert "rank 1" in o["msg"], (rank, o["msg"])
        assert v["c_shm_shm"]["kind"] == "ok" and v["c_shm_shm"]["value"] == "ShmP2P"
    assert res[0]["value"]["c_off_auto"]["where"] == res[1]["value"]["c_off_auto"]["where"]


def test_no_files_left_after_close(suite):
    for rank, r in enumerate(suite):
        # right after close(), on every rank, while the transport objects still exist
        for name in ("mixed", "stream", "order", "mismatch", "timeout", "stop", "abort"):
            assert ok(r[name], name)["files_closed"] == [], (rank, name, r[name]["value"])
        # at the end of the run, for every transport made
        left = r["files_after_close"]
        # one token per transport, and every scenario reported its own
        assert len(left) >= 12, sorted(left)
        assert all(v == [] for v in left.values()), (rank, {k: v for k, v in left.items() if v})
    # and after the processes exited
    for tok in suite[0]["files_after_close"]:
        for d in ("/dev/shm", "/tmp"):
            if os.path.isdir(d):
                assert sw.files_with(d, tok) == [], (d, tok)


def test_ring_bytes_disagreement_is_refused_or_harmless(suite):
    v0, v1 = _scenario(suite, "ring_disagree")
    if v0["create"]["kind"] != "ok" or v1["create"]["kind"] != "ok":
        # refusing is fine, but then on every rank
        assert v0["create"]["kind"] != "ok" and v1["create"]["kind"] != "ok", (v0, v1)
        return
    got = ok(v1["recv"], "receive")
    assert_same(got, [sw.stream_payload(300)[1]], "message through disagreeing rings")


def test_completed_send_survives_a_normal_close(suite):
    v0, v1 = _scenario(suite, "sent_then_closed")
    ok(v0["send"], "send")
    # the ring holding the completed send keeps its name until its reader opens it (rank
    # 1 lists the files before its receive opens the ring; rank 0's own listing races
    # with that receive, which then unlinks the file, so it is not checked)
    assert [f.rsplit("-", 2)[1:] for f in v1["files_closed"]] == [["0", "1"]], v1["files_closed"]
    assert_same(ok(v1["recv"], "receive after the sender closed"), sw.small_payload(1100))


def test_review_findings(suite):
    v0, v1 = _scenario(suite, "review")
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    assert_same(ok(v1["conj"], "conj"), [z.conj().resolve_conj()])
    o = v1["layout"]   # 6 floats as [2, 4] received into [4, 2]: refused, not re-split
    assert o["kind"] == "PeerError" and "other sizes" in o["msg"], o
    o = v1["after"]    # the payload was not consumed: the transport refuses to go on
    assert o["kind"] == "PeerError" and "unusable" in o["msg"], o
    for v in (v0, v1):  # 8 and 20 bytes gathered: refused on every rank
        assert v["gather"]["kind"] == "PeerError" and "bytes" in v["gather"]["msg"], v["gather"]
    o = v0["peer_closed"]
    assert o["kind"] == "PeerExited" and "closed the transport" in o["msg"], o
    assert o["elapsed"] < 2.0, o
    assert v0["stopped_by"] == 1   # rank 1 stopped first; rank 0's later stop keeps it named


# ================================================================ 3 ranks
@pytest.fixture(scope="module")
def gk():
    res, errors = run_ranks(sw.gather_and_kill, 3, timeout=120, allow_errors=True)
    yield res, errors
    # the killed rank's leftovers, if any
    _remove_files([r[k][1] for r in res if r for k in ("gather_where", "where_a", "where_b")])


def _gk_ok(gk):
    res, errors = gk
    assert set(errors) == {2}, errors                    # only the killed rank failed
    assert "-9" in errors[2] or "-SIGKILL" in errors[2], errors[2]
    assert res[0] is not None and res[1] is not None
    return res[:2]


def test_all_gather_repeated(gk):
    for rank, r in enumerate(_gk_ok(gk)):
        assert len(r["rows"]) == 50
        for i, rows in enumerate(r["rows"]):
            assert_same(rows, [sw.gather_payload(q, i) for q in range(3)], f"rank {rank} iter {i}")
        assert_same(ok(r["max"], "256 bytes"), [torch.full((256,), q, dtype=torch.uint8)
                                                for q in range(3)], "256 bytes")
        o = r["too_big"]
        assert o["kind"] == "ValueError" and "256" in o["msg"] and "257" in o["msg"], o
        assert_same(ok(r["after_too_big"], "after"), [sw.gather_payload(q, 50) for q in range(3)])


def test_killed_peer_is_noticed_quickly(gk):
    for rank, r in enumerate(_gk_ok(gk)):
        o = r["killed"]
        # PeerExited (a PeerLost): the process is gone without a failure record
        assert o["kind"] == "PeerExited", (rank, o)
        assert "rank 2" in o["msg"] and o["peer"] == 2, (rank, o["msg"])
        assert o["wall"] - r["killed_at"] < 2.0, (rank, o["wall"] - r["killed_at"])
        assert o["elapsed"] < 2.0, (rank, o["elapsed"])   # the timeout was 30 s


def test_no_files_left_after_a_killed_rank(gk):
    for r in _gk_ok(gk):
        assert r["files_a"] == [], r["files_a"]
        d, tok = r["where_a"]
        assert sw.files_with(d, tok) == []
        d, tok = r["gather_where"]
        assert sw.files_with(d, tok) == []


def test_no_files_left_when_the_killed_rank_had_an_unopened_ring(gk):
    # rank 2 sent on a ring that rank 1 never opened, then was killed: the survivors'
    # close() must remove that file too
    for r in _gk_ok(gk):
        assert r["files_b"] == [], r["files_b"]


# ================================================================ create(): no file left
# In-process, one thread per rank over one HashStore: every rank of create() runs its
# real code (the board file is mapped once per rank), and failures are injected per rank.
def _create_ranks(world, store, prefix, ranks=None, kw_of_rank=None):
    """Run ShmP2P.create on ``ranks`` (default all) in threads; {rank: ("ok", value) or
    (exception type name, message, exception)}."""
    out = {}

    def go(r):
        kw = dict(timeout=5.0)
        kw.update((kw_of_rank or {}).get(r, {}))
        try:
            t = ShmP2P.create(store, prefix, r, world, **kw)
            out[r] = ("ok", t)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out[r] = (type(e).__name__, str(e), e)

    threads = [threading.Thread(target=go, args=(r,), name=f"rank{r}")
               for r in (range(world) if ranks is None else ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _leftovers(store, prefix, gen=1):
    directory, token = store.get(f"{prefix}/shm/{gen}/where").decode().split("\n")
    return sw.files_with(directory, token)


def test_create_timeout_names_the_missing_rank_and_leaves_no_file():
    import torch.distributed as dist
    from overlap.p2p import PeerTimeout
    store = dist.HashStore()
    # rank 1 never comes: rank 0 created the board, then timed out in phase 1
    res = _create_ranks(2, store, "t", ranks=[0], kw_of_rank={0: dict(timeout=0.3)})
    kind, msg, e = res[0]
    assert isinstance(e, PeerTimeout) and "group rank(s) [1] did not arrive within 0.3 s" in msg, \
        res
    assert e.peer == 1
    assert _leftovers(store, "t") == []
    # rank 1 comes late, after rank 0 gave up: it maps a board of its own, then times out
    # in phase 2 (rank 0 never got there); that board is gone too
    res = _create_ranks(2, store, "t", ranks=[1], kw_of_rank={1: dict(timeout=0.3)})
    kind, msg, e = res[1]
    assert isinstance(e, PeerTimeout) and "group rank(s) [0] did not arrive" in msg, res
    assert _leftovers(store, "t") == []
    # rank 0 never comes: nobody can even learn where the board is
    store = dist.HashStore()
    res = _create_ranks(3, store, "u", ranks=[1, 2], kw_of_rank={1: dict(timeout=0.3),
                                                                  2: dict(timeout=0.3)})
    for r in (1, 2):
        kind, msg, e = res[r]
        assert isinstance(e, PeerTimeout) and "group rank(s) [0] did not arrive" in msg, res
        assert e.peer == 0


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("where", ["mmap", "fallocate"])
@pytest.mark.parametrize("mode", ["auto", "shm"])
def test_create_mapping_failure_on_one_rank_leaves_no_file(monkeypatch, where, mode, first):
    """Rank 1 cannot map the board (it creates the file and fails, or fails on the file
    rank 0 created): 'auto' falls back on every rank, 'shm' refuses on every rank; either
    way no board file is left."""
    import errno
    import torch.distributed as dist
    from overlap import shm
    real = {"mmap": mmap.mmap, "fallocate": os.posix_fallocate, "ext": shm._ext}

    def failing(*a, **k):
        if threading.current_thread().name == "rank1":
            raise OSError(errno.ENOMEM if where == "mmap" else errno.ENOSPC, "injected")
        return real[where](*a, **k)

    def ext_later():  # the other rank maps the board first
        if threading.current_thread().name != f"rank{first}":
            time.sleep(0.3)
        return real["ext"]()

    monkeypatch.setattr(shm, "_ext", ext_later)
    if where == "mmap":
        monkeypatch.setattr(shm.mmap, "mmap", failing)
    else:
        monkeypatch.setattr(shm.os, "posix_fallocate", failing)
    store = dist.HashStore()
    res = _create_ranks(2, store, "m", kw_of_rank={r: dict(mode=mode) for r in (0, 1)})
    # (a board rank 0 already reserved needs no posix_fallocate on rank 1: no failure)
    if where == "fallocate" and first == 0:
        assert all(res[r][0] == "ok" and res[r][1] is not None for r in (0, 1)), res
        for r in (0, 1):
            res[r][1].close()
    else:
        for r in (0, 1):
            if mode == "auto":
                assert res[r] == ("ok", None), res
            else:
                assert res[r][0] == "ShmUnavailable" and "injected" in res[r][1], res
    assert _leftovers(store, "m") == []


def test_create_errors_in_phase_1_and_2_leave_no_file():
    import torch.distributed as dist
    from overlap.p2p import PeerTimeout
    # phase 1: a usage error on one rank, different ring sizes
    store = dist.HashStore()
    res = _create_ranks(2, store, "a", kw_of_rank={1: dict(mode="fast")})
    assert all(res[r][0] == "ValueError" for r in (0, 1)), res
    assert _leftovers(store, "a") == []
    store = dist.HashStore()
    res = _create_ranks(2, store, "b", kw_of_rank={0: dict(mode="shm", ring_bytes=4096),
                                                    1: dict(mode="shm", ring_bytes=8192)})
    assert all(res[r][0] == "ShmUnavailable" for r in (0, 1)), res
    assert _leftovers(store, "b") == []

    # phase 2: rank 1's store fails (an exception, then an interrupt): rank 1 raises
    # it, rank 0 times out naming rank 1; no board either way
    class Flaky:
        def __init__(self, store, exc):
            self.store, self.exc = store, exc

        def __getattr__(self, name):
            return getattr(self.store, name)

        def set(self, key, value):
            if "/p2/1" in key:
                raise self.exc
            return self.store.set(key, value)

    for exc in (RuntimeError("injected store failure"), KeyboardInterrupt()):
        store = dist.HashStore()
        flaky = Flaky(store, exc)
        out = {}

        def rank0():
            try:
                ShmP2P.create(store, "c", 0, 2, timeout=0.5)
            except PeerTimeout as e:
                out[0] = e

        def rank1():
            try:
                ShmP2P.create(flaky, "c", 1, 2, timeout=0.5)
            except BaseException as e:  # noqa: BLE001
                out[1] = e

        ts = [threading.Thread(target=f) for f in (rank0, rank1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert type(out[1]) is type(exc), out
        assert "group rank(s) [1] did not arrive" in str(out[0]), out
        assert _leftovers(store, "c") == []


def test_map_removes_only_a_file_it_created(monkeypatch, tmp_path):
    from overlap import shm

    def failing(*a, **k):
        raise OSError(12, "injected")

    path = str(tmp_path / "ring")
    monkeypatch.setattr(shm.mmap, "mmap", failing)
    with pytest.raises(OSError, match="injected"):
        shm._map(path, 8192)
    assert not os.path.exists(path)           # created here: removed
    with open(path, "wb") as f:
        f.write(b"\0" * 8192)
    with pytest.raises(OSError, match="injected"):
        shm._map(path, 8192)
    assert os.path.exists(path)               # the other end's file: kept


def test_rings_are_resident_from_the_start():
    """populate=True (the rings): the whole file is in this process's RSS at once, so RSS
    does not creep up as traffic first touches each page (docs/transport.md)."""
    from overlap import shm

    def shmem_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssShmem"))

    path = f"/dev/shm/dualpipe-test-{os.getpid()}-{time.monotonic_ns()}"
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    before = shmem_kib()
    try:
        keep, _ = shm._map(path, 4 << 20, populate=True)
        assert shmem_kib() - before >= 4096, shmem_kib() - before
        lazy, _ = shm._map(path, 4 << 20)  # the default: pages map when first touched
        assert shmem_kib() - before < 2 * 4096
        del keep, lazy
    finally:
        shm._unlink(path)


def test_pipeline_rss_is_flat_from_the_first_step():
    """The rings are mapped with every page present: a rank's RSS holds both rings of
    each peer (2 x 4 MiB) from its first step and does not creep up with traffic
    (before, it grew by the bytes each step sent until it reached the same ceiling)."""
    marks = [1, 10, 60]
    res = run_ranks(sw.pipeline_rss, 2, 60, marks, timeout=120)
    ring_kib = (4 << 20) // 1024
    for rank, r in enumerate(res):
        assert r["transport"] == "shm", r
        print(f"rank {rank}: RssShmem (KiB) before/after steps {marks}: "
              f"{[r[k] for k in [0] + marks]}")
        assert r[1] >= 2 * ring_kib, (rank, r)        # one ring each way, all resident
        assert r[60] - r[1] <= 16, (rank, r)          # and nothing more afterwards
        assert r[60] <= 2 * ring_kib + 64, (rank, r)  # the ceiling: 8 MiB per peer + board
