"""examples/train_loop.py: the training loop docs/training.md shows, run as users run it
(2 data x 2 pipeline CPU ranks): the loss falls and the checkpoint it saves loads into
one process equal to what the pipeline held; also with FSDP2, torch.compile, activation
checkpointing and bf16 autocast together."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags", [["--steps", "6"],
                                   ["--steps", "4", "--fsdp", "--compile", "--recompute",
                                    "--autocast"]], ids=["plain", "fsdp-compile-recompute-bf16"])
def test_train_loop_example(flags):
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "train_loop.py"), *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert "(falling)" in last and "equals what the pipeline saved" in last, last
