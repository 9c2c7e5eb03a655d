"""Benchmarks (not part of the installed package): run each as ``python -m bench.<name>``.

* ``bench.bubble``      measured vs simulated bubble of every schedule (calibrated sleep stages)
* ``bench.vs_torch``    step time against ``torch.distributed.pipelining`` in the same run
* ``bench.overhead``    runtime cost per compute action with near-zero-cost stages
* ``bench.overlap_gpu`` compute/communication overlap per GPU, software and green-context
  splits (CUDA only)
* ``bench.sm_partition`` which SMs each side of an ``SMPartition`` reaches, and the cost of
  the compute side's budget for a GEMM (CUDA only)
* ``bench.scale``       growth of generate / lower / validate / simulate / plan from 8 x 20 to 128 x 4096
* ``bench/test_micro.py`` pytest-benchmark micro benchmarks (``pytest bench/ --benchmark-only``)

Shared by the benchmarks (one concern each): ``bench.machine`` (what the numbers were
measured on), ``bench.stats`` (summaries, paired ratios; timing a step is
``dualpipe.launch.timed``), ``bench.report`` (tables, JSON files, figures),
``bench.stages`` (calibrated sleep layers, MLP stages), ``bench.pipelines`` (a schedule
wired into our pipeline on one rank, its inputs and labels; torch's schedules available),
``bench.probes`` (patches of the transports and of torch's pipelining that account
waits, posts and compute).

Results go to ``bench/results/`` (the CUDA-only ones to ``out/<name>/``; ``--out`` for
any) as JSON (machine-readable, with the machine described), a markdown table and a PNG
plot. ``scripts/gpu_check.py`` runs the CUDA ones in one time-boxed check.
"""
