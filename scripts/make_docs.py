"""Regenerate the tables and images of docs/schedules.md from the simulator.

    .venv/bin/python scripts/make_docs.py            # print the markdown tables
    .venv/bin/python scripts/make_docs.py --images   # also redraw docs/img/*.png via the CLI

Every number printed here is computed by ``dualpipe.simulate``; nothing is typed in.
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dualpipe.schedules import get_schedule  # noqa: E402
from dualpipe.simulate import Costs, formula_activations, simulate  # noqa: E402

COSTS = Costs(f=1, b=2, w=1, fb=2.5)
NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
PRETTY = {"1f1b": "1F1B", "zb1p": "ZB1P", "dualpipe": "DualPipe", "dualpipev": "DualPipeV"}
IMAGES = [  # (schedule, ranks, chunks, file)
    ("dualpipe", 8, 20, "docs/img/dualpipe_r8_n20.png"),
    ("dualpipev", 4, 20, "docs/img/dualpipev_r4_n20.png"),
]


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def _peaks(p: list[int]) -> str:
    if len(set(p)) == 1:
        return f"{p[0]} on every rank"
    return f"{p[0]} (rank 0) … {p[-1]} (rank {len(p) - 1})"


def table(costs: Costs = COSTS, pps: tuple[int, ...] = (4, 8, 16)) -> str:
    """The reproduced bubble/activation table, one row per schedule and PP."""
    lines = [f"Costs: F={costs.f:g}, B={costs.b:g}, W={costs.w:g}, F&B={costs.pair:g} "
             f"(so F = B − W, the published model's regime); chunks = 4·PP micro-batches.",
             "",
             "| schedule | PP | ranks | chunks | simulated bubble | formula bubble "
             "| simulated peak activations | published activations |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name in NAMES:
        for PP in pps:
            P = PP // 2 if name == "dualpipev" else PP
            N = 4 * PP
            r = simulate(get_schedule(name, P, N), costs)
            lines.append(f"| {PRETTY[name]} | {PP} | {P} | {N} | {_g(r.bubble)} | "
                         f"{_g(r.formula_bubble)} | {_peaks(r.peak_activations)} | "
                         f"{_g(formula_activations(name, P))} |")
    return "\n".join(lines)


def outside_table() -> str:
    """DualPipe 8 ranks x 32 micro-batches with B=2, W=0.5, F&B=3 and F varied."""
    lines = ["DualPipe, 8 ranks × 32 micro-batches, B=2, W=0.5 (so B − W = 1.5), F&B=3; "
             "formula = 3 × (F&B + B − 3W) = 10.5 for every F.",
             "",
             "| F | simulated bubble | (PP/2−1)(F&B + F − 2W) | idle per rank |",
             "|---:|---:|---:|---|"]
    for f in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0):
        c = Costs(f=f, b=2, w=0.5, fb=3)
        r = simulate(get_schedule("dualpipe", 8, 32), c)
        alt = 3 * (c.pair + f - 2 * c.w)
        lines.append(f"| {f:g} | {r.bubble:g} | {alt:g} | "
                     f"{', '.join(f'{x:g}' for x in r.idle)} |")
    return "\n".join(lines)


def images() -> None:
    """Redraw the documentation images with the command line, as a user would."""
    for name, P, N, out in IMAGES:
        (ROOT / out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "dualpipe", "draw", "--schedule", name,
                        "--ranks", str(P), "--chunks", str(N), "--fb", "2.5", "-o", out],
                       cwd=ROOT, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", action="store_true", help="also redraw docs/img/*.png")
    a = ap.parse_args()
    print(table())
    print()
    print(outside_table())
    if a.images:
        images()
    return 0


if __name__ == "__main__":
    sys.exit(main())
