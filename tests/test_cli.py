"""The command line, run as users run it: ``python -m dualpipe ...`` in a subprocess."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "dualpipe", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.mark.parametrize("name,P,N", [("dualpipe", 4, 10), ("dualpipev", 2, 8),
                                      ("1f1b", 4, 8), ("zb1p", 4, 8)])
def test_simulate_json(name, P, N):
    p = _run("simulate", "--schedule", name, "--ranks", str(P), "--chunks", str(N),
             "--fb", "2.5", "--json")
    d = json.loads(p.stdout)
    assert d["schedule"] == name and isinstance(d["schedule"], str)
    assert d["ranks"] == P and type(d["ranks"]) is int
    assert d["chunks"] == N and type(d["chunks"]) is int
    assert isinstance(d["makespan"], float) and d["makespan"] > 0
    assert isinstance(d["bubble"], float) and 0 <= d["bubble"] < d["makespan"]
    assert d["formula_bubble"] is None or isinstance(d["formula_bubble"], float)
    assert isinstance(d["idle"], list) and len(d["idle"]) == P
    assert all(isinstance(x, float) for x in d["idle"])
    assert isinstance(d["peak_activations"], list) and len(d["peak_activations"]) == P
    assert all(type(x) is int and x > 0 for x in d["peak_activations"])
    assert d["bubble"] == pytest.approx(max(d["idle"]))


def test_simulate_text():
    p = _run("simulate", "--schedule", "dualpipe", "--ranks", "4", "--chunks", "8")
    assert "bubble" in p.stdout and "peak activations" in p.stdout


@pytest.mark.parametrize("args", [
    ("simulate", "--schedule", "dualpipe", "--ranks", "3"),        # odd ranks
    ("simulate", "--schedule", "dualpipe", "--ranks", "4", "--chunks", "6"),
    ("simulate", "--schedule", "nope"),                             # argparse choice
    ("simulate", "--w", "5"),                                       # w > b
    ("draw", "--schedule", "1f1b", "--ranks", "2", "--chunks", "2", "-o", "x.svg"),
])
def test_bad_arguments_exit_2(args):
    p = _run(*args, check=False)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.strip(), "expected an error message on stderr"
    assert "Traceback" not in p.stderr


def test_draw_png_and_json(tmp_path):
    png, js = tmp_path / "x.png", tmp_path / "x.json"
    pytest.importorskip("matplotlib")
    _run("draw", "--schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--fb", "2.5",
         "-o", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    _run("draw", "--schedule", "dualpipev", "--ranks", "2", "--chunks", "6", "-o", str(js))
    trace = json.loads(js.read_text())
    assert any(e["ph"] == "X" for e in trace["traceEvents"])
