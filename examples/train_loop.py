"""A complete training loop around DualPipeV: data parallel x pipeline, clipping,
mixed precision, activation checkpointing, torch.compile, and a checkpoint that a single
process loads back.

    python examples/train_loop.py                       # 2 (data) x 2 (pipeline) CPU ranks
    python examples/train_loop.py --fsdp --compile --recompute --autocast

Each of the 4 ranks (gloo; one GPU each with --backend nccl) runs this ``train``
function: a ``DeviceMesh`` of 2 data-parallel replicas x 2 pipeline ranks, DualPipeV over
the pipeline dimension (4 stages: rank r holds stages r and 3-r), replica d training on
its own batches. Per step::

    loss, _ = pipe.step(x, num_chunks=N, criterion=F.mse_loss, labels=(y,))
    sync_grads(pipe, dp_group)           # (FSDP2: sync_grads(pipe); it reduces in the backward)
    norm = clip_grad_norm_(pipe, 1.0)
    opt.step(); opt.zero_grad()

Half-way it saves a checkpoint keyed by stage (``dualpipe.checkpoint.save``); at the
end the parent process loads it into the plain single-process stages
(``checkpoint.load_stages``) and checks they equal what the pipeline saved. Exit status
0 when the loss fell and the checkpoint round-trip matched.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, ROWS = 32, 4  # hidden size; rows per micro-batch


class Block(nn.Module):
    """One pipeline stage: a pre-norm residual MLP (optionally checkpointed)."""

    def __init__(self, stage: int, recompute: bool = False):
        super().__init__()
        torch.manual_seed(100 + stage)
        self.norm = nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
        self.recompute = recompute

    def body(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))

    def forward(self, x):
        if self.recompute:
            return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False)
        return self.body(x)


def batch(step: int, replica: int, n: int, device):
    g = torch.Generator().manual_seed(1000 * replica + step)
    x = torch.randn(n, DIM, generator=g)
    return x.to(device), torch.tanh(x * 1.5).to(device)  # a fixed target function


def train(rank: int, world: int, cfg: dict):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dualpipe import DualPipeV, checkpoint, clip_grad_norm_, sync_grads
    dev_type = "cuda" if cfg["backend"] == "nccl" else "cpu"
    mesh = init_device_mesh(dev_type, (2, world // 2), mesh_dim_names=("dp", "pp"))
    replica, r = mesh.get_local_rank("dp"), mesh.get_local_rank("pp")
    R = world // 2
    device = torch.device(dev_type, torch.cuda.current_device()) if dev_type == "cuda" \
        else torch.device("cpu")
    stages = [Block(r, cfg["recompute"]).to(device), Block(2 * R - 1 - r, cfg["recompute"]).to(device)]
    if cfg["fsdp"]:
        from torch.distributed.fsdp import fully_shard
        for m in stages:
            fully_shard(m, mesh=mesh["dp"])
    if cfg["compile"]:
        stages = [torch.compile(m, backend="aot_eager") for m in stages]
    pipe = DualPipeV(stages, process_group=mesh.get_group("pp"), timeout=120,
                     split_linear_weight_grads=not cfg["fsdp"])
    opt = torch.optim.AdamW(pipe.parameters(), lr=cfg["lr"])
    N = 4 * R
    amp = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if cfg["autocast"] \
        else contextlib.nullcontext
    losses = []
    for step in range(cfg["steps"]):
        x, y = batch(step, replica, N * ROWS, device)
        with amp():
            loss, _ = pipe.step(*((x,) if r == 0 else ()), num_chunks=N,
                                criterion=F.mse_loss if r == 0 else None,
                                labels=(y,) if r == 0 else ())
        # DualPipe's copies (none in DualPipeV) and the replicas; FSDP2 reduced them
        sync_grads(pipe, None if cfg["fsdp"] else mesh.get_group("dp"))
        norm = clip_grad_norm_(pipe, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = torch.zeros(1, device=device) if loss is None else loss.float().mean().reshape(1)
        dist.all_reduce(mean)  # only pipeline rank 0 of each replica holds a loss
        losses.append(mean.item() / 2)
        if rank == 0 and (step % 5 == 0 or step == cfg["steps"] - 1):
            print(f"  step {step:3d}  loss {losses[-1]:.5f}  grad norm {norm.item():.4f}",
                  flush=True)
        if step == cfg["steps"] // 2:
            # every rank, over the world: replicated stages are written once, FSDP2
            # shards each by its owner
            checkpoint.save(pipe, cfg["ckpt"], opt, process_group=dist.group.WORLD)
            saved = {}
            for c, m in enumerate(pipe.module):
                stage = (r, 2 * R - 1 - r)[c]
                saved[stage] = {k.replace("_orig_mod.", ""): _full(v).detach().cpu().clone()
                                for k, v in m.state_dict().items()}
    return {"losses": losses, "saved": saved if replica == 0 else {}}


def _full(t):
    """The whole tensor of an FSDP2 shard (a DTensor), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fsdp", action="store_true", help="shard each stage with FSDP2")
    ap.add_argument("--compile", action="store_true", help="torch.compile the stages")
    ap.add_argument("--recompute", action="store_true", help="checkpoint each stage's body")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast around step()")
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    a = ap.parse_args(argv)
    from dualpipe import checkpoint
    from dualpipe.launch import run_ranks
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(vars(a), ckpt=os.path.join(tmp, "ckpt"))
        extras = [k for k in ("fsdp", "compile", "recompute", "autocast") if cfg[k]]
        print(f"[train_loop] DualPipeV, 2 (data) x 2 (pipeline) ranks on {a.backend}"
              + (f"; {', '.join(extras)}" if extras else ""), flush=True)
        results = run_ranks(train, 4, cfg, backend=a.backend, timeout=600)
        losses = results[0]["losses"]
        saved = {s: w for res in results for s, w in res["saved"].items()}
        plain = [Block(s) for s in range(4)]
        checkpoint.load_stages(cfg["ckpt"], plain)
        same = all(torch.equal(v, saved[s][k]) for s, m in enumerate(plain)
                   for k, v in m.state_dict().items())
    falling = losses[-1] < losses[0]
    print(f"[train_loop] loss {losses[0]:.5f} -> {losses[-1]:.5f} "
          f"({'falling' if falling else 'NOT falling'}); the checkpoint loaded into one "
          f"process {'equals' if same else 'DIFFERS from'} what the pipeline saved")
    return 0 if falling and same else 1


if __name__ == "__main__":
    sys.exit(main())
