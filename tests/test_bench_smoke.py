"""Smoke test: every benchmark CLI runs end to end with tiny settings and writes its files.

The CLIs' ``main(argv)`` run in this process (torch is already imported here; only the
ranks are spawned), with the smallest settings that still go through every code path:
bubble and p2p_latency on 2 ranks (real transfers), vs_torch and overhead on 1 rank
(both runtimes, DualPipeV's two stages on one rank), scale on two tiny rungs (in this
process), plan_verify on its first sleep setting (one ``plan --verify`` process).
Speed is never asserted: only that each exits 0,
prints its table and writes JSON (machine described), markdown and PNG.
"""
from __future__ import annotations

import json

import pytest

CASES = {
    "bubble": ["--ranks", "2", "--chunks", "4", "--schedules", "dualpipev",
               "--f", "0.002", "--b", "0.004", "--w", "0.002", "--warmup", "1",
               "--repeats", "1"],
    "vs_torch": ["--cases", "mlp", "--mlp-ranks", "1", "--mlp-chunks", "4", "--dim", "8",
                 "--rows", "2", "--warmup", "1", "--repeats", "2", "--pairs", "dualpipev",
                 "1f1b"],
    "overhead": ["--ranks", "1", "--chunks", "4", "--warmup", "1", "--repeats", "2",
                 "--schedules", "dualpipev"],
    "p2p_latency": ["--ranks", "2", "--iters", "5", "--warmup", "0", "--repeats", "2"],
    "scale": ["--schedules", "1f1b", "dualpipev", "--ladder", "2x4", "4x8", "--repeats", "1"],
    "plan_verify": ["--cases", "sleep", "--max-settings", "1", "--verify-steps", "1",
                    "--verify-warmup", "0"],
}
NO_PLOT = {"p2p_latency", "plan_verify"}  # a table is the result


@pytest.mark.parametrize("name", list(CASES))
def test_bench_cli_runs(name, tmp_path, capsys):
    import importlib
    mod = importlib.import_module(f"bench.{name}")
    rc = mod.main([*CASES[name], "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for suffix in ("json", "md") + (() if name in NO_PLOT else ("png",)):
        assert (tmp_path / f"{name}.{suffix}").is_file(), f"no {name}.{suffix}\n{text}"
    m = json.loads((tmp_path / f"{name}.json").read_text())["machine"]
    for key in ("cpu_model", "cpu_cores", "torch", "backend"):
        assert key in m, f"machine description lacks {key}"
    assert "----" in text, f"no table printed\n{text}"


def test_overlap_gpu_without_cuda(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench.overlap_gpu would measure, not skip")
    from bench import overlap_gpu
    assert overlap_gpu.main(["--out", str(tmp_path / "o")]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert not (tmp_path / "o").exists(), "nothing may be written without CUDA"
