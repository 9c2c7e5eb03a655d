"""The command line: ``python -m dualpipe ...``.

``simulate --json`` for each schedule and one bad argument run as users run them, in
subprocesses; interpreter start-up (``dualpipe`` imports torch) dominates, so those are
started together, once, by the ``runs`` fixture.  The remaining cases call
``dualpipe.__main__.main`` in this process, which is the same code path.
"""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SIMULATE = {  # schedule -> (ranks, chunks)
    "dualpipe": (4, 10), "dualpipev": (2, 8), "1f1b": (4, 8), "zb1p": (4, 8)}
SUBPROCESS_BAD = ("simulate", "--schedule", "dualpipe", "--ranks", "3")  # odd ranks
BAD = {  # why -> arguments that must exit with code 2 and a message on stderr
    "too few chunks": ("simulate", "--schedule", "dualpipe", "--ranks", "4", "--chunks", "6"),
    "unknown schedule": ("simulate", "--schedule", "nope"),
    "w > b": ("simulate", "--w", "5"),
    "bad suffix": ("draw", "--schedule", "1f1b", "--ranks", "2", "--chunks", "2",
                   "-o", "never_written.svg"),
}


@pytest.fixture(scope="module")
def runs():
    """Start the subprocess commands at once; map a key to its CompletedProcess."""
    cmds = {("sim", n): ("simulate", "--schedule", n, "--ranks", str(P), "--chunks", str(N),
                         "--fb", "2.5", "--json") for n, (P, N) in SIMULATE.items()}
    cmds[("bad",)] = SUBPROCESS_BAD
    procs = {k: subprocess.Popen([sys.executable, "-m", "dualpipe", *a], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, a in cmds.items()}
    done = {}
    for k, p in procs.items():
        so, se = p.communicate(timeout=120)
        done[k] = subprocess.CompletedProcess(p.args, p.returncode, so, se)
    return done


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


@pytest.mark.parametrize("name", sorted(SIMULATE))
def test_simulate_json(runs, name):
    P, N = SIMULATE[name]
    d = json.loads(_ok(runs[("sim", name)]).stdout)
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


def _main(argv, capsys):
    """Run the CLI in this process; return (exit code, stdout, stderr)."""
    from dualpipe.__main__ import main
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_argument_subprocess(runs):
    p = runs[("bad",)]
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "even" in p.stderr and "Traceback" not in p.stderr


def test_simulate_text(capsys):
    rc, out, err = _main(("simulate", "--schedule", "dualpipe", "--ranks", "4", "--chunks", "8"),
                         capsys)
    assert rc == 0, err
    assert "bubble" in out and "peak activations" in out


@pytest.mark.parametrize("why", sorted(BAD))
def test_bad_arguments_exit_2(why, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(BAD[why], capsys)
    assert rc == 2, (rc, out, err)
    assert err.strip(), "expected an error message on stderr"
    assert not (tmp_path / "never_written.svg").exists()


@pytest.mark.parametrize("suffix", [".png", ".json"])
def test_draw_writes(suffix, capsys, tmp_path):
    if suffix == ".png":
        pytest.importorskip("matplotlib")
    out = tmp_path / f"x{suffix}"
    rc, _, err = _main(("draw", "--schedule", "dualpipe", "--ranks", "4", "--chunks", "8",
                        "--fb", "2.5", "-o", str(out)), capsys)
    assert rc == 0, err
    if suffix == ".png":
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    else:
        trace = json.loads(out.read_text())
        assert any(e["ph"] == "X" for e in trace["traceEvents"])


def test_draw_png_without_matplotlib_says_which_extra(tmp_path, monkeypatch, capsys):
    """No traceback: the message names the extra to install, and a trace still works."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from dualpipe.__main__ import main
    args = ["draw", "--schedule", "1f1b", "--ranks", "2", "--chunks", "2", "-o"]
    assert main(args + [str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and "[draw]" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
    assert main(args + [str(tmp_path / "x.json")]) == 0
    assert (tmp_path / "x.json").is_file()
