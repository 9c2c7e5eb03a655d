"""Per-rank functions for tests/test_connect.py (module level, so spawned ranks import them)."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

TO = datetime.timedelta(seconds=20)


def open_each_mode(rank: int, world: int) -> dict:
    """Open a transport in each mode on the default group, send a tensor around the ring
    of ranks and all_gather on it, close it; record what was built."""
    from overlap.connect import open_transport
    from overlap.transport import Transport
    group = dist.group.WORLD
    store = dist.distributed_c10d._get_default_store()
    out = {}
    # the last: another backend (the name only matters here), on the caller's group
    for key, mode, backend in (("auto", "auto", "gloo"), ("group", "group", "gloo"),
                               ("shm", "shm", "gloo"), ("other", "auto", "mpi")):
        try:
            conn = open_transport(group, store, f"connect-test/{key}", backend=backend,
                                  device=torch.device("cpu"), mode=mode, timeout=20,
                                  ring_bytes=1 << 16)
        except ValueError as e:  # "shm" without shared memory: refused on every rank
            out[key] = ("ValueError", str(e))
            continue
        t = conn.transport
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        recv = t.irecv([torch.empty(3)], prv, "from prev", tag=5)
        send = t.isend([torch.full((3,), float(rank))], nxt, "to next", tag=5)
        got = recv.wait(TO)[0].tolist()
        send.wait(TO)
        rows = [x.item() for x in t.all_gather(torch.tensor([rank * 10]), world, "g").wait(TO)]
        out[key] = {"name": conn.name, "transport": type(t).__name__,
                    "is_transport": isinstance(t, Transport),
                    "groups": type(conn.groups).__name__, "shm": conn.shm is t,
                    "callers_group": getattr(t, "group", None) is group,
                    "got": got, "rows": rows}
        conn.close()
        conn.close()  # idempotent
        out[key]["closed"] = conn.closed and conn.groups is None
    return out
