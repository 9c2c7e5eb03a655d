"""Run a function on N CPU ranks (gloo over loopback) and collect what each returns.

Every rank runs ``fn(rank, world, *args)`` in a fresh spawned process, one torch thread
each.  ``run_ranks`` returns the per-rank results, re-raises the first rank's
exception (with its traceback text), and kills everything after ``timeout`` seconds,
so a hang fails the test instead of blocking the suite.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, q, args, pg_timeout):
    import datetime

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
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
        except Exception:
            pass


class RankError(RuntimeError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = min(errors)
        super().__init__(f"rank {first} failed: {errors[first]}")


def run_ranks(fn, world: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0,
              allow_errors: bool = False):
    """Returns ``[result of rank 0, ...]``; with ``allow_errors`` returns ``(results,
    errors)`` where ``errors[rank]`` is the text of that rank's exception."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, q, args, pg_timeout),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import queue as _q
    import time
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
            except _q.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive()
                        and r not in results and r not in errors]
                if dead and q.empty():
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
    if allow_errors:
        return [results.get(r) for r in range(world)], errors
    if errors:
        raise RankError(errors)
    return [results[r] for r in range(world)]
