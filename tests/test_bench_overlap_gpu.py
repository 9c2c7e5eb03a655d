"""bench.overlap_gpu's plan and report, on CPU: which settings it measures (green-context
partitions included, nothing measured twice), that it closes partitions, records failed
settings and writes outside the source tree by default. The CUDA measurement itself
(``_Comp``, ``_Comm``, ``_measure``) is replaced by fakes here; it runs in the GPU check.
"""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from bench import overlap_gpu as og

TOTAL = 132


def _args(**kw):
    base = dict(m=64, comm_mib=1, comm_sms=[0, 8, 8, 20, 24], compute=list(og.COMPUTES),
                comm=list(og.COMMS), partitions=list(og.PARTITIONS), iters=1, warmup=0,
                max_seconds=None, out=None)
    base.update(kw)
    return argparse.Namespace(**base)


class FakePartition:
    """SMPartition's surface used by the bench; rounds up to multiples of 8 like Hopper."""

    made: list = []

    def __init__(self, k, device, *, backend):
        if backend == "torch_green_ctx" and k > 16:
            from overlap.partition import PartitionUnavailableError
            raise PartitionUnavailableError("pretend torch cannot carve that here")
        self.backend = backend
        self.comm_sms = -(-k // 8) * 8
        self.compute_sms = TOTAL - self.comm_sms
        self.enforced = "both" if backend == "green_ctx" else "comm"
        self.closed = False
        FakePartition.made.append(self)

    def describe(self):
        return {"backend": self.backend, "comm_sms": self.comm_sms,
                "compute_sms": self.compute_sms, "enforced": self.enforced}

    def stream_pair(self):
        return ("pair", self)

    def close(self):
        self.closed = True


@pytest.fixture
def fakes(monkeypatch):
    import overlap.partition
    FakePartition.made = []
    monkeypatch.setattr(overlap.partition, "SMPartition", FakePartition)
    measured = []

    class Comp:
        def __init__(self, kind, m, num_sms, device):
            self.kind, self.num_sms = kind, num_sms

    class Comm:
        def __init__(self, kind, comm_sms, nbytes, device, groups):
            if kind == "sm_copy" and comm_sms == 24:
                raise RuntimeError("pretend kernel failure")
            self.kind, self.comm_sms = kind, comm_sms

    def measure(comp, comm, pair, iters, warmup):
        if pair != "software":
            assert pair[1].closed is False, "measured on a closed partition"
        measured.append((comp.kind, comp.num_sms, comm.kind, comm.comm_sms))
        return {"t_comp_ms": 2.0, "t_comm_ms": 1.0, "t_both_ms": 2.5,
                "overlap_efficiency": 0.5, "hidden_fraction": 0.5, "exposed_comm_ms": 0.5}
    monkeypatch.setattr(og, "_Comp", Comp)
    monkeypatch.setattr(og, "_Comm", Comm)
    monkeypatch.setattr(og, "_measure", measure)
    monkeypatch.setattr("overlap.streams.StreamPair.create", classmethod(lambda cls, d: "software"))
    return measured


def test_software_settings_follow_the_budget():
    rows = og.settings_for("software", 20, TOTAL, ["cublas", "persistent"], list(og.COMMS))
    by = {(s.compute, s.comm): s for s in rows}
    assert by["persistent", "nccl_a2a"].compute_sms == 112 and by["persistent", "nccl_a2a"].comm_sms == 20
    assert by["cublas", "sm_copy"].compute_sms == TOTAL  # cuBLAS ignores budgets
    assert by["persistent", "ce_memcpy"].comm_sms == 0 and by["persistent", "ce_memcpy"].compute_sms == TOTAL
    assert not any(s.compute_confined for s in rows)
    none = og.settings_for("software", 0, TOTAL, ["persistent"], ["sm_copy"])[0]
    assert (none.comm_sms, none.compute_sms) == (0, TOTAL)


def test_green_context_settings_are_confined():
    rows = og.settings_for("green_ctx", 20, TOTAL, ["cublas", "persistent"], list(og.COMMS),
                           comm_sms=24, compute_sms=108, enforced="both")
    assert all(s.compute_confined and s.compute_sms == 108 for s in rows)
    by = {(s.compute, s.comm): s for s in rows}
    assert by["cublas", "sm_copy"].comm_confined is True
    assert by["cublas", "nccl_a2a"].comm_confined is False  # NCCL's own stream
    assert by["cublas", "ce_memcpy"].comm_confined is None
    torch_rows = og.settings_for("torch_green_ctx", 16, TOTAL, ["cublas"], ["sm_copy"],
                                 comm_sms=16, compute_sms=116, enforced="comm")
    assert torch_rows[0].compute_sms == TOTAL and not torch_rows[0].compute_confined
    with pytest.raises(ValueError, match="granted"):
        og.settings_for("green_ctx", 8, TOTAL, ["cublas"], ["sm_copy"])


def test_run_measures_each_setting_once_and_closes_partitions(fakes):
    skipped = {}
    rows, parts, truncated, errors = og._run_all(_args(), torch.device("cpu"), TOTAL, skipped, 0.0)
    assert not truncated
    keys = [og.Setting(**{f: r[f] for f in og.Setting.__dataclass_fields__}).key() for r in rows]
    assert len(keys) == len(set(keys)), "a setting was measured twice"
    assert {r["partition"] for r in rows} == {"software", "green_ctx", "torch_green_ctx"}
    order = list(dict.fromkeys(r["partition"] for r in rows))
    assert order == ["software", "torch_green_ctx", "green_ctx"], "our green contexts run last"
    # 8 twice and 20 -> 24 on the green context: one row each
    green = sorted({r["comm_sms"] for r in rows if r["partition"] == "green_ctx"})
    assert green == [0, 8, 24]  # 0: the copy engine
    # the copy-engine copy beside a software split is the same whatever the budget
    assert sum(1 for r in rows if r["partition"] == "software" and r["comm"] == "ce_memcpy") == 2
    assert all(p.closed for p in FakePartition.made)
    assert "torch_green_ctx comm_sms=20" in skipped and "pretend torch" in skipped[
        "torch_green_ctx comm_sms=20"]
    assert errors and all(e["setting"]["comm"] == "sm_copy" for e in errors)
    assert [p["backend"] for p in parts][:1] == ["software"]


def test_checkpoint_before_each_split(fakes):
    seen = []
    og._run_all(_args(comm_sms=[0, 8]), torch.device("cpu"), TOTAL, {}, 0.0,
                checkpoint=lambda rows, parts, errors: seen.append((len(rows), len(parts))))
    assert [p for _, p in seen] == list(range(len(seen))) and len(seen) == 4
    assert seen[0] == (0, 0) and seen[-1][0] > 0


def test_run_stops_starting_settings_after_max_seconds(fakes):
    rows, _parts, truncated, _ = og._run_all(_args(max_seconds=0.0), torch.device("cpu"),
                                             TOTAL, {}, -1.0)
    assert truncated and rows == []
    assert all(p.closed for p in FakePartition.made)


def test_report_writes_json_md_png(fakes, tmp_path):
    a = _args(out=str(tmp_path / "o"))
    skipped = {}
    rows, parts, truncated, errors = og._run_all(a, torch.device("cpu"), TOTAL, skipped, 0.0)
    machine = {"gpu": "FakeGPU", "cpu_model": "x", "cpu_cores_usable": 1, "torch": "t",
               "backend": "nccl", "load_avg_1_5_15": [0.0]}
    out = og.write_report(a, machine, TOTAL, skipped, rows, parts, truncated, errors, 1.0)
    data = json.loads((out / "overlap_gpu.json").read_text())
    assert data["rows"] and data["errors"] and "green_ctx|cublas|sm_copy" in data["best_split"]
    md = (out / "overlap_gpu.md").read_text()
    assert "**Failed**" in md and "green_ctx" in md
    assert (out / "overlap_gpu.png").is_file()


def test_default_output_is_not_the_source_tree():
    assert og.DEFAULT_OUT == os.path.join("out", "overlap_gpu")
    assert "results" not in og.DEFAULT_OUT
