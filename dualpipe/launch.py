"""Spawn ``world`` local ranks, run a function on each, collect the results.

``run_ranks(fn, world, *args)`` starts one process per rank (``spawn``), initialises
``torch.distributed`` (gloo on CPU; NCCL with one GPU per rank when ``backend="nccl"``),
runs ``fn(rank, world, *args)`` and returns the per-rank results in rank order.  Before
spawning, :func:`check_backend` refuses a backend this machine cannot run (NCCL without
CUDA GPUs, or with fewer GPUs than ranks) with a :class:`BackendError` saying what to
change, instead of a failure inside every child.  A rank
that raises makes ``run_ranks`` raise :class:`RankError` with every failing rank's
traceback; ``timeout`` bounds the whole run (processes are killed after it), so a hang
becomes an error.  ``fn`` must be importable (defined at module level).

Inside the ranks, :func:`timed` brackets a step with a barrier and the system-wide
clock, and :func:`makespans` turns every rank's ``(start, end)`` into each step's
makespan (the benchmarks and ``python -m dualpipe plan --verify`` time with them).
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue as _queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

__all__ = ["run_ranks", "RankError", "BackendError", "check_backend", "free_port", "timed",
           "makespans"]

BACKENDS = ("gloo", "nccl")


class BackendError(ValueError):
    """The requested process-group backend cannot run here (the message says why and
    what to use instead)."""


def check_backend(backend: str, world: int) -> None:
    """Raise :class:`BackendError` unless ``world`` local ranks can use ``backend``.

    ``"gloo"`` runs anywhere.  ``"nccl"`` needs a CUDA build of torch with NCCL and one
    visible GPU per rank (rank ``r`` uses ``cuda:r``).  Touches no GPU beyond counting
    devices, so it is safe to call before spawning.
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "nccl":
        return
    import torch
    import torch.distributed as dist
    if torch.version.cuda is None:
        raise BackendError(f"NCCL needs CUDA GPUs: torch {torch.__version__} is a CPU-only "
                           "build (torch.version.cuda is None); use the gloo backend "
                           "(--backend gloo) or install a CUDA build of torch")
    if not torch.cuda.is_available():
        raise BackendError(f"NCCL needs CUDA GPUs: torch {torch.__version__} (CUDA "
                           f"{torch.version.cuda}) sees none (torch.cuda.is_available() is "
                           "False: no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them); "
                           "use the gloo backend (--backend gloo)")
    if not dist.is_nccl_available():
        raise BackendError(f"NCCL needs a torch built with NCCL; torch {torch.__version__} "
                           "has none (torch.distributed.is_nccl_available() is False); use "
                           "the gloo backend (--backend gloo)")
    gpus = torch.cuda.device_count()
    if world > gpus:
        raise BackendError(f"NCCL runs one GPU per rank: {world} ranks need {world} GPUs, "
                           f"{gpus} visible; use at most {gpus} ranks, or the gloo backend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, q, args, pg_timeout, backend, threads):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    try:
        kw = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            # bound to its GPU, NCCL creates the communicator now, not inside the first
            # collective (which would then also time the communicator's creation)
            kw["device_id"] = torch.device("cuda", rank)
        try:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=pg_timeout), **kw)
        except TypeError:  # a torch without device_id
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
        out = fn(rank, world, *args)
        buf = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
        torch.save(out, buf)
        q.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((rank, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


class RankError(RuntimeError):
    """One or more ranks failed; ``errors[rank]`` is each one's exception text."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = min(errors)
        super().__init__(f"rank {first} failed: {errors[first]}")


def run_ranks(fn, world: int, *args, timeout: float = 300.0, pg_timeout: float = 60.0,
              backend: str = "gloo", threads: int = 1, allow_errors: bool = False):
    """Returns ``[result of rank 0, ...]``; with ``allow_errors`` returns ``(results,
    errors)`` (a failed rank's result is ``None``) instead of raising."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    check_backend(backend, world)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, q, args, pg_timeout, backend,
                                              threads), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world)) - set(results) - set(errors))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s "
                                   f"(errors so far: {errors})")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive()
                        and r not in results and r not in errors]
                if dead:
                    time.sleep(0.5)
                    if q.empty():
                        for r in dead:
                            errors[r] = f"process exited with code {procs[r].exitcode}"
                continue
            if status == "ok":
                import torch
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if allow_errors:
        return [results.get(r) for r in range(world)], errors
    if errors:
        raise RankError(errors)
    return [results[r] for r in range(world)]


def timed(fn: Callable[[], Any], device=None) -> tuple[float, float, Any]:
    """Barrier, run ``fn``, return ``(t_start, t_end, result)`` on the system-wide
    monotonic clock (``time.perf_counter`` is CLOCK_MONOTONIC on Linux, so ranks on one
    machine can be compared: a step's makespan is max(end) - min(start))."""
    import torch
    import torch.distributed as dist
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    return t0, t1, out


def makespans(per_rank: Sequence[Sequence[tuple[float, float]]]) -> list[float]:
    """``per_rank[r][i] = (start, end)`` of repeat ``i`` -> makespan of each repeat."""
    n = len(per_rank[0])
    return [max(r[i][1] for r in per_rank) - min(r[i][0] for r in per_rank) for i in range(n)]
