"""overlap.p2p: metadata packing and the one-direction-per-backend routing."""
import pytest
import torch

from overlap.p2p import META_LEN, P2P, TensorMeta, pack_meta, unpack_meta


def test_meta_roundtrip():
    metas = [TensorMeta((2, 3), torch.float32, True), TensorMeta((4,), torch.int64, False),
             TensorMeta((), torch.bfloat16, False)]
    t = pack_meta(metas)
    assert t.shape == (META_LEN,) and t.dtype == torch.int64
    assert unpack_meta(t) == metas


def test_meta_too_large_says_what_to_change():
    with pytest.raises(ValueError, match="at most"):
        pack_meta([TensorMeta((1, 2, 3, 4, 5, 6), torch.float32, False)] * 10)


class _Rec:
    def __init__(self, name):
        self.name, self.calls = name, []

    def send(self, ts, peer, tag):
        self.calls.append(("send", peer))
        return _Done()

    def recv(self, ts, peer, tag):
        self.calls.append(("recv", peer))
        return _Done()


class _Done:
    def is_completed(self):
        return True

    def wait(self, timeout=None):
        return True


def test_directional_backends_carry_one_direction_each():
    # rank 1 of 3: to/from rank 2 (higher) and rank 0 (lower)
    up, down = _Rec("up"), _Rec("down")
    p = P2P(backend=(up, down), rank=1)
    x = torch.zeros(1)
    p.isend([x], 2, "a")   # to a higher rank: up
    p.irecv([x], 2, "b")   # from a higher rank: that rank sent "down"
    p.isend([x], 0, "c")   # to a lower rank: down
    p.irecv([x], 0, "d")   # from a lower rank: it sent "up"
    assert up.calls == [("send", 2), ("recv", 0)]
    assert down.calls == [("recv", 2), ("send", 0)]
    with pytest.raises(ValueError, match="group rank"):
        P2P(backend=(up, down))
