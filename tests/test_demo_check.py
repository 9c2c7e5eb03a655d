"""The demo's first-step reference check compares for real, on every backend, and NCCL
without CUDA GPUs is refused before anything is spawned.

``_check_first_step`` is fed rank results built from the reference itself, then
perturbed by one ulp of one loss or one gradient entry: the check must see both. The
NCCL branch is the same code with the reference on ``cuda:0``; here its device is moved
to the CPU so the comparison itself runs.
"""
import time

import pytest
import torch

from dualpipe import demo
from dualpipe.launch import BackendError, check_backend

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA GPUs")


def _cfg(backend="gloo"):
    return dict(schedule="dualpipev", ranks=1, chunks=4, steps=1, dim=8, micro_batch=2,
                lr=0.05, backend=backend, timeout=30.0, transport="auto")


def _results_from_reference(cfg):
    losses, grads = demo._reference_first_step(cfg, torch.device("cpu"))
    first = {"loss": losses.clone(), "loss_rows": (0, cfg["chunks"]),
             "grads": {s: {n: t.clone() for n, t in g.items()} for s, g in grads.items()}}
    return [{"first": first, "device": "cpu", "device_name": "cpu"}]


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_check_compares_losses_and_gradients(backend, monkeypatch):
    monkeypatch.setattr(demo, "_reference_device", lambda _backend: torch.device("cpu"))
    cfg = _cfg(backend)
    good = demo._check_first_step(cfg, _results_from_reference(cfg))
    assert good["matches"] and good["losses_bitwise_equal"]
    assert good["losses_compared"] == cfg["chunks"] and good["grad_tensors_compared"] == 12
    assert good["worst_grad_cosine_distance"] < 1e-13

    bad_loss = _results_from_reference(cfg)
    loss = bad_loss[0]["first"]["loss"]
    loss[1] = torch.nextafter(loss[1], loss[1] + 1)
    c = demo._check_first_step(cfg, bad_loss)
    assert not c["matches"] and not c["losses_bitwise_equal"] and c["loss_max_abs_diff"] > 0
    assert "DIFFER" in demo._describe_check(c)

    bad_grad = _results_from_reference(cfg)
    g = bad_grad[0]["first"]["grads"][1]["fc1.weight"]
    g.view(-1)[0] += 10 * g.abs().max()
    c = demo._check_first_step(cfg, bad_grad)
    assert not c["matches"] and c["losses_bitwise_equal"]
    assert c["worst_grad_cosine_distance"] > 1e-13
    assert "ABOVE" in demo._describe_check(c)


def test_check_counts_missing_losses_as_a_mismatch(monkeypatch):
    cfg = _cfg()
    res = _results_from_reference(cfg)
    res[0]["first"]["loss_rows"] = (0, 2)
    res[0]["first"]["loss"] = res[0]["first"]["loss"][:2]
    c = demo._check_first_step(cfg, res)
    assert c["losses_compared"] == 2 and not c["matches"]


def test_nccl_reference_is_on_the_first_gpu():
    assert demo._reference_device("nccl") == torch.device("cuda", 0)
    assert demo._reference_device("gloo") == torch.device("cpu")


@CPU_ONLY
def test_nccl_without_gpus_is_a_clear_error_before_spawning(capsys):
    with pytest.raises(BackendError, match="NCCL needs CUDA GPUs"):
        check_backend("nccl", 1)
    from dualpipe.__main__ import main
    t0 = time.perf_counter()
    assert main(["demo", "--backend", "nccl", "--ranks", "1", "--steps", "1"]) == 2
    assert time.perf_counter() - t0 < 5, "must fail before spawning ranks"
    err = capsys.readouterr().err
    assert "NCCL needs CUDA GPUs" in err and "--backend gloo" in err


def test_check_backend_rejects_unknown_backends():
    check_backend("gloo", 3)
    with pytest.raises(BackendError, match="one of"):
        check_backend("mpi", 1)
