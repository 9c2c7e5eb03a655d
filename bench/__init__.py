"""Benchmarks (not part of the installed package): run each as ``python -m bench.<name>``.

* ``bench.bubble``      measured vs simulated bubble of every schedule (calibrated sleep stages)
* ``bench.vs_torch``    step time against ``torch.distributed.pipelining`` in the same run
* ``bench.overhead``    runtime cost per compute action with near-zero-cost stages
* ``bench.overlap_gpu`` compute/communication overlap per GPU (CUDA only)
* ``bench.scale``       growth of generate / lower / validate / simulate / plan from 8 x 20 to 128 x 4096
* ``bench/test_micro.py`` pytest-benchmark micro benchmarks (``pytest bench/ --benchmark-only``)

Results go to ``bench/results/`` as JSON (machine-readable, with the machine described),
a markdown table and a PNG plot.
"""
