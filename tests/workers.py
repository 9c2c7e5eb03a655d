"""Functions run on each rank by tests (module level, so spawned processes import them)."""
from __future__ import annotations

import torch

from tests.models import MB, HookStage, Stage, criterion, make_batch


def build(name: str, rank: int, world: int, num_chunks: int, tuple_io=False, hook=False, **kw):
    from dualpipe import DualPipe, DualPipeV, Pipeline
    from dualpipe.schedules import get_schedule
    s = get_schedule(name, world, num_chunks)
    cls = HookStage if hook else Stage
    mods = [cls(stage, tuple_io) for (_st, stage) in s.placement[rank]]
    if name == "dualpipe":
        return DualPipe(mods, **kw), s
    if name == "dualpipev":
        return DualPipeV(mods, **kw), s
    return Pipeline(mods[0], schedule=name, **kw), s


def rank_io(s, rank: int, xs, ys):
    """This rank's share of the batch: inputs for a first stage, labels for a last."""
    ins, outs = s.input_microbatches(rank), s.loss_microbatches(rank)
    inputs = () if ins is None else tuple(x[ins.start * MB:ins.stop * MB] for x in xs)
    labels = () if outs is None else tuple(y[outs.start * MB:outs.stop * MB] for y in ys)
    return inputs, labels, None if outs is None else (outs.start, outs.stop)


def pipeline_cases(rank: int, world: int, cases: list[dict]):
    """Run each case (a dict) and return what the parent compares with the reference."""
    from dualpipe import set_p2p_tensor_dtype, set_p2p_tensor_shapes
    from dualpipe.runtime import boundary  # the declarations' home
    out = []
    for case in cases:
        if case.get("toy"):
            from tests.toy_schedule import ensure_registered
            ensure_registered()
        name, N = case["schedule"], case["chunks"]
        tuple_io, hook = case.get("tuple_io", False), case.get("hook", False)
        train = case.get("train", True)
        ret = case.get("return_outputs", False)
        boundary._p2p_shapes, boundary._p2p_dtype = None, None
        if case.get("preset_shapes"):
            set_p2p_tensor_shapes([(MB, 8)])
            set_p2p_tensor_dtype(torch.float32)
        HookStage.calls = 0
        p, s = build(name, rank, world, N, tuple_io, hook,
                     split_linear_weight_grads=case.get("split_linear", False),
                     timeout=case.get("timeout", 60),
                     transport=case.get("transport", "auto"))
        res = {"losses": [], "outputs": [], "loss_slice": None, "peaks": [],
               "transport": p.transport}
        for step in range(case.get("steps", 1)):
            xs, ys = make_batch(step, N, tuple_io)
            inputs, labels, loss_slice = rank_io(s, rank, xs, ys)
            res["loss_slice"] = loss_slice
            with torch.set_grad_enabled(train):
                loss, outs = p.step(*inputs, num_chunks=N,
                                    criterion=criterion if labels else None,
                                    labels=labels, return_outputs=ret)
            res["losses"].append(loss)
            res["outputs"].append(outs)
            res["peaks"].append(p.last_stats.peak_activations)
        res["grads"] = {}
        for c, (_st, stage) in enumerate(s.placement[rank]):
            res["grads"].setdefault(stage, []).append(
                {n: q.grad.clone() for n, q in p.module[c].named_parameters()
                 if q.grad is not None})
        res["hook_calls"] = HookStage.calls
        res["timeline_len"] = len(p.timeline)
        out.append(res)
        boundary._p2p_shapes, boundary._p2p_dtype = None, None
    return out


def mesh_dp_pp(rank: int, world: int, num_chunks: int):
    """2 x 2 (data x pipeline) DeviceMesh; each data replica runs DualPipe on its
    pipeline group.  Replica 1 numbers its pipeline ranks in reverse (rank_mapping)."""
    from torch.distributed.device_mesh import init_device_mesh

    from dualpipe import DualPipe
    from dualpipe.schedules import get_schedule
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    dp = mesh.get_local_rank("dp")
    pp_group = mesh.get_group("pp")
    mapping = [0, 1] if dp == 0 else [1, 0]
    pp_rank = mapping[pp_group.rank()]
    s = get_schedule("dualpipe", 2, num_chunks)
    mods = [Stage(stage) for (_st, stage) in s.placement[pp_rank]]
    p = DualPipe(mods, process_group=pp_group, rank_mapping=mapping, timeout=60)
    xs, ys = make_batch(dp, num_chunks, False)  # each replica its own data
    inputs, labels, loss_slice = rank_io(s, pp_rank, xs, ys)
    loss, _ = p.step(*inputs, num_chunks=num_chunks, criterion=criterion, labels=labels)
    grads = {stage: [{n: q.grad.clone() for n, q in p.module[c].named_parameters()}]
             for c, (_st, stage) in enumerate(s.placement[pp_rank])}
    # the data-parallel group is untouched by the pipeline: an all-reduce across it works
    t = torch.tensor([float(dp)])
    torch.distributed.all_reduce(t, group=mesh.get_group("dp"))
    return {"dp": dp, "pp_rank": pp_rank, "loss": loss, "loss_slice": loss_slice,
            "grads": grads, "dp_sum": float(t)}


def big_activations(rank: int, world: int):
    """DualPipeV with 16 KiB activations through 4 KiB shared-memory rings (every message
    streams through its ring while both ranks compute) against the same pipeline on gloo:
    losses and gradients must be bitwise equal (same operations in the same order)."""
    import os

    import torch.nn as nn

    from dualpipe import DualPipeV
    from dualpipe.schedules import get_schedule
    os.environ["DUALPIPE_SHM_RING_BYTES"] = "4096"
    N, rows, dim = 8, 4, 1024
    s = get_schedule("dualpipev", world, N)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(N * rows, dim, generator=g), torch.randn(N * rows, dim, generator=g)
    out = {}
    for transport in ("group", "shm"):
        mods = []
        for _st, stage in s.placement[rank]:
            torch.manual_seed(100 + stage)
            mods.append(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()))
        p = DualPipeV(mods, transport=transport, timeout=60)
        loss, _ = p.step(*((x,) if rank == 0 else ()), num_chunks=N,
                         criterion=(lambda o, t: ((o - t) ** 2).mean()) if rank == 0 else None,
                         labels=(y,) if rank == 0 else ())
        out[transport] = {"transport": p.transport, "loss": loss,
                          "grads": [q.grad.clone() for q in p.parameters()]}
    return out
