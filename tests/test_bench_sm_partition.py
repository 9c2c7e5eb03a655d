"""bench.sm_partition's pure parts on CPU (SM-id ranges, what a probe result says, the
report) and its no-CUDA exit; the measurements themselves run in the GPU check."""
from __future__ import annotations

import argparse

import pytest
import torch

from bench import sm_partition as smp


def test_compact_ranges():
    assert smp.compact([]) == ""
    assert smp.compact([5]) == "5"
    assert smp.compact({7, 0, 1, 2, 5, 8}) == "0-2,5,7-8"
    assert smp.compact(range(132)) == "0-131"


def test_probe_facts_disjoint_and_fitting():
    f = smp.probe_facts({"comm": set(range(8)), "compute": set(range(8, 132))}, 8, 124)
    assert f["disjoint"] and f["comm_fits"] and f["compute_fits"]
    assert (f["comm_reached"], f["compute_reached"], f["shared"]) == (8, 124, 0)
    assert f["comm_ids"] == "0-7" and f["invalid_ids"] == []


def test_probe_facts_report_sharing_and_overflow():
    f = smp.probe_facts({"comm": set(range(10)) | {-1}, "compute": set(range(132))}, 8, 124)
    assert not f["disjoint"] and f["shared"] == 10 and f["shared_ids"] == "0-9"
    assert not f["comm_fits"] and f["comm_extra"] == 3  # 0-9 and the -1 of a block that never ran
    assert not f["compute_fits"] and f["compute_extra"] == 8
    assert f["invalid_ids"] == [-1]


def test_render_md_names_every_row():
    a = argparse.Namespace(m=64, iters=3, max_seconds=10.0)
    machine = {"gpu": "FakeGPU", "cpu_model": "x", "cpu_cores_usable": 1, "torch": "t",
               "backend": "cuda", "load_avg_1_5_15": [0.0]}
    device = {"sm_count": 132, "capability": "9.0", "extension": "cuda",
              "driver_granularity": {"total": 132, "min_partition": 8, "alignment": 8},
              "plain_stream_probe": {"reached": 132, "ids": "0-131"}}
    rows = [
        {"backend": "green_ctx", "requested_comm_sms": 16,
         "partition": {"comm_sms": 16, "compute_sms": 116, "enforced": "both"},
         "probe": smp.probe_facts({"comm": set(range(16)), "compute": set(range(16, 132))},
                                  16, 116),
         "gemm_on_compute_side": {"persistent": {"ms": 2.0, "vs_all_sms": 1.1},
                                  "cublas": {"ms": 1.5, "vs_all_sms": None}}},
        {"backend": "torch_green_ctx", "requested_comm_sms": 8, "unavailable": "no Stream()"},
    ]
    md = smp.render_md(machine, device, {"backend": "green_ctx"}, {"cublas": {"ms": 1.0, "tflops": 500.0}},
                       rows, True, [{"where": "x", "error": "y"}], a)
    for text in ("FakeGPU", "green_ctx", "16/116", "0-15", "2.000 (1.10)", "no Stream()",
                 "Truncated", "**Failed**: x: y", "min partition 8", "reached 132 SMs"):
        assert text in md, text


def test_without_cuda_writes_nothing(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench.sm_partition would measure")
    assert smp.main(["--out", str(tmp_path / "o")]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()
