"""Regenerate the tables and images of docs/schedules.md from the simulator.

    .venv/bin/python scripts/make_docs.py            # print the markdown tables
    .venv/bin/python scripts/make_docs.py --images   # also redraw docs/img/*.png via the CLI
    .venv/bin/python scripts/make_docs.py --sweep    # also test closed forms on random costs

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


def sweep(samples: int = 1500, seed: int = 3) -> str:
    """Random cost sets outside the F = B - W regime: how often each closed form holds.

    DualPipe/DualPipeV are compared with (PP/2-1)(F&B + F - 2W) (the middle ranks'
    idle when forwards are the slower hop), ZB1P with its published formula.
    """
    import random

    rng = random.Random(seed)
    tally: dict[tuple[str, str], list[int]] = {}
    for _ in range(samples):
        name = rng.choice(("dualpipe", "dualpipev", "zb1p"))
        PP = rng.choice((4, 8, 16))
        P = PP // 2 if name == "dualpipev" else PP
        N = rng.choice((2 * PP, 3 * PP, 4 * PP + 2))
        w, i, f = (round(rng.uniform(lo, hi), 2) for lo, hi in ((0, 1), (0.5, 2), (0.3, 2.5)))
        b = i + w
        fb = round(rng.uniform(max(f, b), f + b), 2)
        r = simulate(get_schedule(name, P, N), Costs(f=f, b=b, w=w, fb=fb))
        if name == "zb1p":
            expect = r.formula_bubble
            region = "W <= min(F, B-W)" if w <= min(f, i) else "W > min(F, B-W)"
        else:
            expect = (PP / 2 - 1) * (fb + f - 2 * w)
            region = ("F >= B-W >= W" if f >= i >= w else
                      "F < B-W" if f < i else "F >= B-W, W > B-W")
        hit = tally.setdefault((name if name == "zb1p" else "dualpipe/v", region), [0, 0])
        hit[0] += abs(r.bubble - expect) < 1e-9
        hit[1] += 1
    lines = ["| schedule | cost region | closed form | holds in |", "|---|---|---|---:|"]
    for (name, region), (ok, n) in sorted(tally.items()):
        form = "(PP−1)(F+B−2W)" if name == "zb1p" else "(PP/2−1)(F&B+F−2W)"
        lines.append(f"| {name} | {region} | {form} | {ok}/{n} |")
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
    ap.add_argument("--sweep", action="store_true",
                    help="also check the closed forms on random costs outside the regime")
    a = ap.parse_args()
    print(table())
    print()
    print(outside_table())
    if a.sweep:
        print()
        print(sweep())
    if a.images:
        images()
    return 0


if __name__ == "__main__":
    sys.exit(main())
