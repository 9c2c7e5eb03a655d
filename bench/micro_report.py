"""Render a pytest-benchmark JSON of ``bench/test_micro.py`` as a markdown table and a plot.

    .venv/bin/python -m pytest bench/ --benchmark-only --benchmark-json bench/results/micro.json
    .venv/bin/python -m bench.micro_report bench/results/micro.json

Writes ``micro.md`` and ``micro.png`` next to the JSON and drops the raw per-round samples
from the JSON (summary statistics stay; ``--keep-samples`` keeps them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.machine import describe_machine
from bench.report import md_table, new_figure, save_figure, text_table


def _skipped_note(machine: dict, benches: list) -> str:
    """Say which GPU-only benchmark is absent from the file (pytest-benchmark does not
    record skipped tests) and why, from what the file itself holds."""
    names = {b["name"] for b in benches}
    if any(n.startswith("test_persistent_matmul") for n in names):
        return ("CUDA timings end with torch.cuda.synchronize() after each call "
                "(extra_info timing).")
    gpu = machine.get("gpu") if machine else None
    why = "no GPU on this machine" if not gpu else f"not in this run on {gpu}"
    return f"Not timed ({why}): the Triton persistent matmul (timed on CUDA only)."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.micro_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--keep-samples", action="store_true",
                   help="leave the raw per-round samples in the JSON (dropped by default)")
    a = p.parse_args(argv)
    path = Path(a.json)
    data = json.loads(path.read_text())
    benches = data.get("benchmarks") or []
    if not benches:
        raise SystemExit(f"{path} holds no benchmarks: run pytest bench/ --benchmark-only "
                         "--benchmark-json first")
    if not a.keep_samples:  # the raw per-round samples make the file ~1 MB; keep the stats
        for b in benches:
            b.get("stats", {}).pop("data", None)
        path.write_text(json.dumps(data, indent=1) + "\n")
    m = data.get("machine_info", {}).get("dualpipe_bench") or {}
    rows = []
    for b in benches:
        st = b["stats"]
        extra = b.get("extra_info") or {}
        note = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in extra.items())
        rows.append([b["name"], f"{st['median'] * 1e6:.1f}", f"{st['iqr'] * 1e6:.1f}",
                     f"{st['min'] * 1e6:.1f}", st["rounds"], note])
    md = ["# Micro benchmarks (`pytest bench/ --benchmark-only`)", ""]
    if m:
        md += [f"Machine: {describe_machine(m)}.", ""]
    md += ["Times in microseconds per call (pytest-benchmark: median, IQR, min over rounds).",
           _skipped_note(m, benches), "",
           md_table(["benchmark", "median us", "IQR us", "min us", "rounds", "extra"],
                           rows), ""]
    fig, (ax,) = new_figure(1, 8, max(3.0, 0.22 * len(rows)))
    names = [r[0] for r in rows]
    ax.barh(range(len(rows)), [float(r[1]) for r in rows], color="#4477aa")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median us per call (log)")
    ax.set_title("bench/test_micro.py" + (f" — {describe_machine(m)}" if m else ""),
                 fontsize=8)
    save_figure(fig, path.with_suffix(".png"))
    md += [f"![micro benchmarks]({path.with_suffix('.png').name})", ""]
    path.with_suffix(".md").write_text("\n".join(md))
    print(text_table(["benchmark", "median us", "IQR us"], [r[:3] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
