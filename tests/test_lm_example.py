"""examples/lm_dualpipev.py: a decoder-only LM (token ids in, logits out, a bool mask and
int64 position ids passed through every stage) trained under DualPipeV with the sequence
length changing every step; per-micro-batch losses bitwise equal to a single process at
every step, and falling."""
from __future__ import annotations

import torch

from examples.lm_dualpipev import (BOS, IGNORE, PAD, VOCAB, FirstStage, LastStage, MiddleStage,
                                   main, make_batch, make_stage)

SMALL = ["--chunks", "4", "--batch", "2", "--dim", "16", "--ffn", "32", "--lr", "2e-2",
         "--timeout", "120"]


def test_trains_bitwise_equal_to_one_process_with_changing_sequence_lengths():
    out = main(SMALL + ["--ranks", "2", "--steps", "6", "--seq-lens", "16", "24", "12"])
    assert out["ok"], out
    assert out["bitwise"] == [True] * 6
    assert out["loss_fell"]
    assert [len(x) for x in out["losses"]] == [4] * 6
    assert out["results"][0]["transport"] == "shm"
    assert out["results"][1]["losses"] == [None] * 6


def test_tied_head_on_one_rank():
    out = main(SMALL + ["--ranks", "1", "--steps", "4", "--tie", "--seq-lens", "10", "14"])
    assert out["ok"] and out["bitwise"] == [True] * 4, out


def test_stage_interfaces():
    cfg = {"stages": 4, "vocab": len(VOCAB), "dim": 16, "heads": 2, "ffn": 32, "seed": 0,
           "tie": False}
    ids, labels = make_batch(0, 0, rows=3, seq=12)
    assert ids.dtype == labels.dtype == torch.int64 and ids.shape == labels.shape == (3, 12)
    assert (ids[:, 0] == BOS).all()
    # labels are the next token, -100 where it is padding
    real = ids != PAD
    assert ((labels != IGNORE) == real).all()
    assert torch.equal(labels[:, :-1][real[:, 1:]], ids[:, 1:][real[:, 1:]])
    first, mid, last = (make_stage(s, cfg) for s in (0, 1, 3))
    assert isinstance(first, FirstStage) and isinstance(mid, MiddleStage)
    assert isinstance(last, LastStage)
    h, mask, pos = first(ids)
    assert h.dtype == torch.float32 and h.shape == (3, 12, 16)
    assert mask.dtype == torch.bool and pos.dtype == torch.int64
    h2, mask2, pos2 = mid(h, mask, pos)
    assert mask2 is mask and pos2 is pos   # passed through unchanged
    logits = last(h2, mask2, pos2)
    assert logits.shape == (3, 12, len(VOCAB))
