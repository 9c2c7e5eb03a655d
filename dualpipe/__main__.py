"""Command line: ``python -m dualpipe {simulate,draw,plan,demo}``.

* ``simulate`` prices a schedule under a cost model (``--json`` for one JSON object);
* ``draw`` writes a schedule's simulated timeline as a PNG or a Chrome/Perfetto trace;
* ``plan`` recommends a schedule, pipeline/data-parallel sizes and a micro-batch count
  from one block's costs, measured or given, and with --verify runs the recommendation
  and a runner-up through the runtime (see dualpipe.plan; no --comm-sms in this
  version);
* ``demo`` trains a small model with DualPipe on several processes (see dualpipe.demo).
"""
from __future__ import annotations

import argparse
import json
import sys

from .draw import MissingDrawDependency
from .schedules import SCHEDULES, get_schedule
from .simulate import Costs, simulate


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="dualpipe")
    p.add_argument("--ranks", type=int, default=8, help="number of pipeline ranks")
    p.add_argument("--chunks", type=int, default=20, help="number of micro-batches per step")
    p.add_argument("--f", type=float, default=1.0, help="cost of a forward chunk")
    p.add_argument("--b", type=float, default=2.0, help="cost of a full backward chunk")
    p.add_argument("--w", type=float, default=1.0, help="cost of its weight-gradient part")
    p.add_argument("--fb", type=float, default=None,
                   help="cost of an overlapped forward+backward pair (default f+b)")
    p.add_argument("--latency", type=float, default=0.0, help="p2p latency per transfer")


def _costs(a) -> Costs:
    return Costs(f=a.f, b=a.b, w=a.w, fb=a.fb, latency=a.latency)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="store_true",
                    help="print the version and what was built (extension, CUDA arch, Triton)")
    sub = ap.add_subparsers(dest="cmd")
    ps = sub.add_parser("simulate", help="price a schedule: makespan, bubble, idle, activations")
    _add_schedule_args(ps)
    ps.add_argument("--json", action="store_true", help="print one JSON object")
    pd = sub.add_parser("draw", help="draw a schedule to .png or Chrome trace .json")
    _add_schedule_args(pd)
    pd.add_argument("-o", "--output", required=True, help="output file, .png or .json")
    pd.add_argument("--title", default=None)
    from . import plan as _plan
    pp = sub.add_parser("plan", help="recommend schedule, P, DP and micro-batches for a model",
                        description=_plan.HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _plan.add_arguments(pp)
    pm = sub.add_parser("demo", help="train a small model with DualPipe on several processes")
    from . import demo as _demo
    _demo.add_arguments(pm)
    a = ap.parse_args(argv)
    if a.cmd == "plan":
        _plan.check_arguments(pp, a)
    if a.version:
        from . import __version__
        print(f"dualpipe {__version__}")
        try:
            from overlap import format_build_info
            print(format_build_info())
        except ImportError as e:  # the overlap package is optional for the schedule tools
            print(f"  build info unavailable: {e}")
        return 0
    if a.cmd is None:
        ap.error("choose a command: simulate, draw, plan or demo (or --version)")
    try:
        if a.cmd == "simulate":
            res = simulate(get_schedule(a.schedule, a.ranks, a.chunks), _costs(a))
            if a.json:
                print(json.dumps(res.to_json()))
            else:
                d = res.to_json()
                print(f"{d['schedule']}: {d['ranks']} ranks, {d['chunks']} micro-batches")
                print(f"  makespan          {d['makespan']:g}")
                print(f"  bubble            {d['bubble']:g}   (published formula: {d['formula_bubble']})")
                print(f"  idle per rank     {[round(x, 6) for x in d['idle']]}")
                print(f"  peak activations  {d['peak_activations']}   (published: "
                      f"{d['formula_activations']})")
            return 0
        if a.cmd == "draw":
            from .draw import draw
            s = get_schedule(a.schedule, a.ranks, a.chunks)
            res = simulate(s, _costs(a))
            draw(a.output, res.intervals, s, title=a.title)
            print(f"wrote {a.output}")
            return 0
        if a.cmd == "plan":
            return _plan.run(a)
        if a.cmd == "demo":
            return _demo.run(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MissingDrawDependency as e:  # matplotlib, for PNGs
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
