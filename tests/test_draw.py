"""dualpipe.draw: PNG and Chrome/Perfetto trace output of simulated and measured timelines."""
import json

import pytest

from dualpipe.draw import draw, to_chrome_trace, to_png
from dualpipe.schedules import FB, SEND_F, Action, get_schedule
from dualpipe.simulate import Costs, Interval, simulate

CASES = [("dualpipe", 4, 8), ("dualpipev", 2, 6), ("1f1b", 3, 5), ("zb1p", 3, 5)]


def _sim(name, P, N):
    s = get_schedule(name, P, N)
    return s, simulate(s, Costs(f=1, b=2, w=1, fb=2.5)).intervals


def _check_png(path):
    mpimg = pytest.importorskip("matplotlib.image")
    img = mpimg.imread(str(path))
    h, w = img.shape[:2]
    assert 200 <= h <= 4000 and 600 <= w <= 4000, (h, w)
    flat = img.reshape(-1, img.shape[-1])[:, :3]
    # not blank: many distinct colours, and both dark and light pixels
    assert len({tuple(px) for px in flat[:: max(1, len(flat) // 20000)]}) > 8
    assert flat.min() < 0.2 and flat.max() > 0.9


@pytest.mark.parametrize("name,P,N", CASES)
def test_png_written(tmp_path, name, P, N):
    pytest.importorskip("matplotlib")
    s, ivs = _sim(name, P, N)
    out = tmp_path / f"{name}.png"
    draw(out, ivs, s)
    assert out.stat().st_size > 5000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_png(out)


def test_png_measured_lanes(tmp_path):
    """Measured seconds with an arbitrary clock origin and a second lane per rank."""
    pytest.importorskip("matplotlib")
    s, ivs = _sim("dualpipe", 4, 8)
    t0 = 1000.0
    measured = [Interval(iv.rank, t0 + iv.start * 1e-3, t0 + iv.end * 1e-3, iv.action)
                for iv in ivs]
    measured += [Interval(r, t0 + 1e-3 * k, t0 + 1e-3 * k + 2e-4, Action(SEND_F, 0, k, peer=r + 1),
                          lane="comm") for r in range(3) for k in range(4)]
    out = tmp_path / "m.png"
    to_png(measured, s, out, title="measured", time_unit="s")
    _check_png(out)


def test_trace(tmp_path):
    s, ivs = _sim("dualpipe", 4, 8)
    out = tmp_path / "t.json"
    ret = to_chrome_trace(ivs, s, out)
    trace = json.loads(out.read_text())
    assert trace == json.loads(json.dumps(ret))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    parts = sum(2 if iv.action.kind == FB else 1 for iv in ivs if iv.end > iv.start)
    assert len(xs) == parts
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in xs)
    assert {e["pid"] for e in xs} == set(range(s.num_ranks))
    for e in xs:
        a = e["args"]
        assert {"kind", "chunk", "mb", "stream", "stage"} <= set(a)
        assert s.placement[e["pid"]][a["chunk"]] == (a["stream"], a["stage"])
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(s.num_ranks)}
    # every F&B pair gives an F part and a B part over the same span
    fb = [iv for iv in ivs if iv.action.kind == FB][0]
    same = [e for e in xs if e["pid"] == fb.rank and e["args"]["action"] == str(fb.action)]
    assert sorted(e["name"][0] for e in same) == ["B", "F"]
    assert same[0]["ts"] == same[1]["ts"] and same[0]["dur"] == same[1]["dur"]


def test_trace_units_and_lanes():
    s = get_schedule("1f1b", 2, 2)
    ivs = [Interval(0, 5.0, 5.5, Action("F", 0, 0)),
           Interval(0, 5.1, 5.2, Action(SEND_F, 0, 0, peer=1), lane="comm")]
    tr = to_chrome_trace(ivs, s, time_unit="s")
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert xs[0]["ts"] == 0 and xs[0]["dur"] == pytest.approx(5e5)
    assert xs[1]["tid"] != xs[0]["tid"] and xs[1]["ts"] == pytest.approx(1e5)
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in tr["traceEvents"]
               if e["name"] == "thread_name"}
    assert threads[(0, xs[0]["tid"])] == "compute" and threads[(0, xs[1]["tid"])] == "comm"
    with pytest.raises(ValueError, match="time_unit"):
        to_chrome_trace(ivs, s, time_unit="fortnights")


def test_bad_suffix(tmp_path):
    s, ivs = _sim("1f1b", 2, 2)
    with pytest.raises(ValueError, match=r"\.png or \.json"):
        draw(tmp_path / "x.svg", ivs, s)
    with pytest.raises(ValueError, match="suffix"):
        draw(tmp_path / "x", ivs, s)


def test_bad_intervals(tmp_path):
    s = get_schedule("1f1b", 2, 2)
    with pytest.raises(ValueError, match="rank 5"):
        to_chrome_trace([Interval(5, 0.0, 1.0, Action("F", 0, 0))], s)
    with pytest.raises(ValueError, match="end >= start"):
        to_chrome_trace([Interval(0, 2.0, 1.0, Action("F", 0, 0))], s)
    with pytest.raises(ValueError, match="no intervals"):
        to_png([], s, tmp_path / "e.png")


def test_import_without_matplotlib_at_module_level():
    import pathlib
    import subprocess
    import sys
    code = ("import sys; import dualpipe.draw; "
            "assert 'matplotlib' not in sys.modules, 'draw imported matplotlib eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=pathlib.Path(__file__).resolve().parents[1])


def test_measured_string_labels(tmp_path):
    """overlap.timeline may label spans with strings: text forms parse, others stay labels."""
    s = get_schedule("dualpipe", 2, 4)
    ivs = [Interval(0, 0.0, 1e-3, "F0.0"), Interval(0, 1e-3, 3e-3, "F0.1+B1.0"),
           Interval(0, 1e-3, 1.5e-3, "attn", lane="fb"),
           Interval(1, 0.5e-3, 1e-3, "dispatch", lane="fb")]
    tr = to_chrome_trace(ivs, s, time_unit="s")
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in xs] == ["F0.0", "F0.1", "B1.0", "attn", "dispatch"]
    assert xs[3]["args"]["kind"] == "attn" and xs[3]["args"]["action"] == "attn"
    assert xs[1]["args"]["stream"] == 0 and xs[2]["args"]["microbatch"] == 2
    pytest.importorskip("matplotlib")
    to_png(ivs, s, tmp_path / "labels.png", time_unit="s")
    _check_png(tmp_path / "labels.png")
