"""A small MoE transformer block whose all-to-alls overlap compute under DualPipe.

Run from the repository root::

    python examples/moe_block.py                  # 4 CPU ranks: 2 pipeline x 2 expert-parallel
    python examples/moe_block.py --pp 1 --ep 4    # no pipeline: 4 expert-parallel ranks
    python examples/moe_block.py --help

What it shows
-------------
* :class:`MoEBlock` -- attention, a top-k router and experts, with the expert-parallel
  **dispatch** and **combine** as ``torch.distributed.all_to_all_single(async_op=True)``
  over an expert-parallel group (fixed capacity per expert, so every shape is static).
  It is an :class:`overlap.fb.SubStageModule` declaring five sub-stages::

      attn (compute) -> dispatch (comm) -> experts (compute) -> combine (comm) -> reduce (compute)

  ``attn`` also routes and permutes the tokens into per-expert slots; ``reduce`` adds the
  returned expert outputs back to their tokens (DeepEP's combine does this reduction inside
  its kernel; here it is a small compute sub-stage so both all-to-alls stay pure data
  movement whose backward is another all-to-all).  The class therefore has the generated
  ``overlapped_forward_backward`` that DualPipe calls for every F&B pair.
* DualPipe on a pipeline x expert ``DeviceMesh`` (2 x 2 gloo ranks on the CPU): each of the
  two expert-parallel replicas runs the same DualPipe schedule on its own pipeline group,
  and the two ranks of an expert group exchange tokens with all-to-alls.
* ``--pp 1``: the same block with **no pipeline parallelism** (the usual shape of an
  expert-parallel MoE job): every rank runs the ``fb-only`` schedule on a pipeline of one
  (``F0, F1+B0, ..., B(N-1)``), so each F&B pair still hides one micro-batch's
  all-to-alls under the other's compute; the same checks and overlap figures follow.
* Checks: the overlapped order against the sequential order (losses bit for bit, gradients
  to a cosine distance < 1e-13), and both against a single-process reference that emulates
  the expert group (same kernels on the same shapes).
* Measured overlap: the sub-stage spans recorded by :mod:`overlap.fb` into an
  :class:`overlap.timeline.Timeline` give the hidden-communication fraction of every F&B
  pair (``overlap_per_window``); the timeline is drawn to ``out/moe/*.png`` and a Chrome
  trace ``out/moe/*.json``.  On a CPU a local gloo all-to-all of these sizes takes well
  under a millisecond, so ``--delay-ms`` adds an optional artificial latency to every
  all-to-all (it completes no earlier than ``delay`` after its launch, without blocking
  the host) to show the overlap with communication that takes time; both the real and
  the delayed runs are reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python examples/moe_block.py` from a checkout
    sys.path.insert(0, _ROOT)

from dualpipe.utils import cosine_distance  # noqa: E402
from overlap.fb import (FB_WINDOW_LANE, SUBSTAGE_COMM_LANE, SUBSTAGE_COMPUTE_LANE,  # noqa: E402
                        CommHandle, SubStageModule, comm, compute, defer_weight_grad,
                        run_async)
from overlap.timeline import Timeline, overlap_per_window, windows  # noqa: E402

__all__ = ["MoEConfig", "ExpertGroup", "MoEBlock", "COMBINE_EARLY_ORDER", "criterion",
           "make_data", "emulate_all_to_all", "reference", "canonical_grads",
           "fb_window_stats", "rank_main", "check_numerics", "draw_timeline", "draw_pair",
           "main"]

#: The interleaving this example uses for an F&B pair (see ``docs`` in examples/README.md):
#: DeepSeek's published order, with ``F:combine`` moved before ``B:attn`` so that on a host
#: that issues work in order every all-to-all has compute behind it.
COMBINE_EARLY_ORDER: tuple[str, ...] = (
    "B:reduce", "B:combine", "F:attn", "B:experts", "F:dispatch", "B:dispatch",
    "W:experts", "F:experts", "F:combine", "B:attn", "W:attn", "F:reduce")


# ------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class MoEConfig:
    """Sizes of one block.  A micro-batch is ``[batch, seq, dim]`` float32; it has
    ``T = batch * seq`` tokens, each routed to ``top_k`` of ``num_experts`` experts, each
    expert taking at most ``capacity(T)`` tokens from every rank (the rest are dropped:
    they keep only their residual)."""

    dim: int = 64
    heads: int = 4
    seq: int = 32
    ffn: int = 256
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.heads <= 0 or self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of heads "
                             f"({self.heads})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={self.num_experts}, "
                             f"got {self.top_k}")
        if self.capacity_factor <= 0 or self.seq <= 0 or self.ffn <= 0:
            raise ValueError("capacity_factor, seq and ffn must be > 0")

    def capacity(self, tokens: int) -> int:
        """Slots per expert for a micro-batch of ``tokens`` tokens (per source rank)."""
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts))


class _Linear(torch.autograd.Function):
    """``x @ w.T + b`` whose weight/bias gradients go through
    :func:`overlap.defer_weight_grad`, so an F&B pair runs them at its ``W`` steps."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.bias = b
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, None, None]:
        x, w = ctx.saved_tensors
        b = ctx.bias

        @torch.no_grad()
        def weight_grad() -> None:
            g2 = gy.reshape(-1, gy.shape[-1])
            _accumulate(w, g2.t() @ x.reshape(-1, x.shape[-1]))
            if b is not None:
                _accumulate(b, g2.sum(0))

        defer_weight_grad(weight_grad)
        return gy @ w, None, None


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    p.grad = g if p.grad is None else p.grad + g


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return _Linear.apply(x, w, b)


class ExpertGroup:
    """The expert-parallel group the all-to-alls of a block run over.

    ``group``: a ``torch.distributed`` process group (every rank of it holds
    ``num_experts / size`` experts), or ``None`` for a single-process block (``size=1``:
    the all-to-all is a copy; ``size>1`` with ``rank``: only for building the experts of
    that rank in a single-process reference, which emulates the all-to-alls itself).
    ``comm_delay_s``: optional artificial latency; each all-to-all completes no earlier
    than this many seconds after its launch (the host is not blocked).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, size: int | None = None,
                 rank: int | None = None, comm_delay_s: float = 0.0) -> None:
        if group is not None:
            if size is not None or rank is not None:
                raise ValueError("pass either a process group or size/rank, not both")
            size, rank = dist.get_world_size(group), dist.get_rank(group)
        size = 1 if size is None else int(size)
        rank = 0 if rank is None else int(rank)
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"expert-parallel rank {rank} is not in 0..{size - 1}")
        if not (comm_delay_s >= 0 and math.isfinite(comm_delay_s)):
            raise ValueError(f"comm_delay_s must be a finite number of seconds >= 0, "
                             f"got {comm_delay_s}")
        self.group, self.size, self.rank = group, size, rank
        self.comm_delay_s = float(comm_delay_s)

    def all_to_all(self, x: torch.Tensor) -> CommHandle:
        """Start an equal-split ``all_to_all_single`` of ``x`` along dim 0 (chunk ``j``
        goes to rank ``j``; the result holds every rank's chunk for this rank, in rank
        order) and return its :class:`CommHandle` at once."""
        if x.shape[0] % self.size:
            raise ValueError(f"all_to_all: dim 0 ({x.shape[0]}) must be divisible by the "
                             f"expert-parallel size {self.size}")
        x = x.contiguous()
        out = torch.empty_like(x)
        t0 = time.perf_counter()
        work = None
        if self.group is None:
            if self.size != 1:
                raise RuntimeError("this ExpertGroup has no process group (a reference "
                                   "block): emulate the all-to-all with emulate_all_to_all")
            out.copy_(x)
        else:
            work = dist.all_to_all_single(out, x, group=self.group, async_op=True)
        if self.comm_delay_s > 0:
            delay = self.comm_delay_s

            def finish() -> torch.Tensor:
                if work is not None:
                    work.wait()
                left = t0 + delay - time.perf_counter()
                if left > 0:
                    time.sleep(left)
                return out

            return run_async(finish)
        return CommHandle.ready(out) if work is None else CommHandle.from_work(work, out)


def _carry(inner: CommHandle, before: Sequence[torch.Tensor | None],
           after: Sequence[torch.Tensor | None]) -> CommHandle:
    """A handle whose result is ``(*before, <inner's result>, *after)``: tensors that
    travel alongside a communication (the residual, the routing index)."""
    def wait() -> tuple:
        return (*before, *inner.wait(), *after)

    return CommHandle(wait, stream_ordered=inner.stream_ordered,
                      on_done=inner.add_done_callback)


class Expert(nn.Module):
    """A 2-layer GELU MLP ``dim -> ffn -> dim``."""

    def __init__(self, cfg: MoEConfig, gen: torch.Generator) -> None:
        super().__init__()
        d, f = cfg.dim, cfg.ffn
        self.w1 = nn.Parameter(torch.randn(f, d, generator=gen) * d ** -0.5)
        self.b1 = nn.Parameter(torch.randn(f, generator=gen) * 0.02)
        self.w2 = nn.Parameter(torch.randn(d, f, generator=gen) * f ** -0.5)
        self.b2 = nn.Parameter(torch.randn(d, generator=gen) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(F.gelu(_linear(x, self.w1, self.b1)), self.w2, self.b2)


class MoEBlock(SubStageModule):
    """Pre-norm transformer block: causal self-attention, then a top-k MoE MLP whose
    experts are spread over an expert-parallel group.

    Input and output: ``float32[batch, seq, dim]`` (one micro-batch).  The attention and
    router weights are replicated on every rank of the expert group (each rank feeds
    its own micro-batches; their gradients are summed over the group like data
    parallelism); rank ``e`` holds experts ``e*L .. e*L+L-1`` (``L = num_experts /
    size``).  Weights depend only on ``(cfg.seed, stage, expert id)``, so every copy of
    a stage is identical, whichever rank builds it.

    Sub-stages (tensors passed along: residual ``h`` ``[B, S, D]``, token slots
    ``int64[E*C]`` = token index or ``T`` for an empty slot):

    ``attn``      ``x -> (h, send, tok)``; ``send`` ``[E*C, D+1]`` = per-expert slots of
                  normalised tokens, last column the token's gate weight;
    ``dispatch``  all-to-all of ``send`` -> ``recv`` ``[size*L*C, D+1]``;
    ``experts``   ``-> (h, out, tok)``, ``out`` ``[size*L*C, D]`` = expert(token) * gate;
    ``combine``   all-to-all back -> ``back`` ``[E*C, D]`` in the slot order of ``send``;
    ``reduce``    ``h + sum of the returned slots of each token``.
    """

    overlap_order = COMBINE_EARLY_ORDER

    def __init__(self, cfg: MoEConfig, stage: int, ep: ExpertGroup | None = None) -> None:
        super().__init__()
        ep = ep if ep is not None else ExpertGroup()
        if cfg.num_experts % ep.size:
            raise ValueError(f"num_experts ({cfg.num_experts}) must be divisible by the "
                             f"expert-parallel size ({ep.size})")
        self.cfg, self.stage, self.ep = cfg, int(stage), ep
        self.num_local = cfg.num_experts // ep.size
        d = cfg.dim
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * stage + 1)
        self.wqkv = nn.Parameter(torch.randn(3 * d, d, generator=g) * d ** -0.5)
        self.bqkv = nn.Parameter(torch.randn(3 * d, generator=g) * 0.02)
        self.wo = nn.Parameter(torch.randn(d, d, generator=g) * d ** -0.5)
        self.bo = nn.Parameter(torch.randn(d, generator=g) * 0.02)
        self.wr = nn.Parameter(torch.randn(cfg.num_experts, d, generator=g) * d ** -0.5)
        first = ep.rank * self.num_local
        self.experts = nn.ModuleList(
            Expert(cfg, torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + 7919 * stage + 104_729 * (gid + 1)))
            for gid in range(first, first + self.num_local))
        self.expert_ids = list(range(first, first + self.num_local))

    # -- the sub-stages -------------------------------------------------------------
    def substages(self):
        return [compute("attn", self.attn_route, split_weight_grad=True),
                comm("dispatch", self._dispatch, self._a2a_backward),
                compute("experts", self.run_experts, split_weight_grad=True),
                comm("combine", self._combine, self._a2a_backward),
                compute("reduce", self.reduce)]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``x + causal_self_attention(layer_norm(x))``; ``x`` ``[B, S, D]``."""
        b, s, d = x.shape
        h = self.cfg.heads
        a = F.layer_norm(x, (d,))
        qkv = _linear(a, self.wqkv, self.bqkv).view(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        o = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return x + _linear(o.transpose(1, 2).reshape(b, s, d), self.wo, self.bo)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing with a fixed capacity ``C`` per expert.  Returns ``send``
        ``[E*C, D+1]`` (expert ``e``'s slots are rows ``e*C .. e*C+C-1``; top-1 choices
        claim slots before top-2 choices, then by token order) and ``tok`` ``int64[E*C]``."""
        b, s, d = h.shape
        t, e_n, k = b * s, self.cfg.num_experts, self.cfg.top_k
        c = self.cfg.capacity(t)
        n = F.layer_norm(h, (d,)).reshape(t, d)
        probs = _linear(n, self.wr).softmax(-1)
        top_p, top_i = probs.topk(k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        with torch.no_grad():
            e = top_i.t().reshape(-1)                                # [k*T], top-1 first
            pos = (F.one_hot(e, e_n).cumsum(0) - 1).gather(1, e[:, None]).squeeze(1)
            slot = torch.where(pos < c, e * c + pos, torch.full_like(e, e_n * c))
            src = torch.full((e_n * c + 1,), k * t, dtype=torch.long, device=h.device)
            src.scatter_(0, slot, torch.arange(k * t, device=h.device))
            src = src[: e_n * c]                                     # drop the overflow slot
            tok = torch.where(src < k * t, src % t, torch.full_like(src, t))
        g_slot = torch.cat([gates.t().reshape(-1), gates.new_zeros(1)])[src]
        x_slot = torch.cat([n, n.new_zeros(1, d)])[tok]
        return torch.cat([x_slot, g_slot[:, None]], 1), tok

    def attn_route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sub-stage ``attn``: ``x -> (h, send, tok)``."""
        h = self.attention(x)
        send, tok = self.route(h)
        return h, send, tok

    def run_experts(self, h: torch.Tensor, recv: torch.Tensor,
                    tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sub-stage ``experts``: each local expert runs on its slots from every rank,
        scaled by the slot's gate (0 for an empty slot)."""
        p, lo, d = self.ep.size, self.num_local, self.cfg.dim
        c = recv.shape[0] // (p * lo)
        r = recv.view(p, lo, c, d + 1)
        outs = []
        for j, ex in enumerate(self.experts):
            xin = r[:, j].reshape(p * c, d + 1)
            outs.append((ex(xin[:, :d]) * xin[:, d:]).view(p, c, d))
        return h, torch.stack(outs, 1).reshape(p * lo * c, d), tok

    def reduce(self, h: torch.Tensor, back: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Sub-stage ``reduce``: ``h`` plus, for every token, the sum of its returned
        expert outputs (dropped tokens get nothing)."""
        b, s, d = h.shape
        t = b * s
        z = back.new_zeros(t + 1, d).index_add(0, tok, back)[:t]
        return h + z.view(b, s, d)

    def _dispatch(self, h: torch.Tensor, send: torch.Tensor, tok: torch.Tensor) -> CommHandle:
        return _carry(self.ep.all_to_all(send), (h,), (tok,))

    def _combine(self, h: torch.Tensor, out: torch.Tensor, tok: torch.Tensor) -> CommHandle:
        return _carry(self.ep.all_to_all(out), (h,), (tok,))

    def _a2a_backward(self, g_h: torch.Tensor, g_mid: torch.Tensor,
                      _g_tok: torch.Tensor) -> CommHandle:
        # an equal-split all-to-all is its own adjoint: the gradient goes back the same way
        return _carry(self.ep.all_to_all(g_mid), (g_h,), (None,))


def criterion(y: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Last-stage loss of one micro-batch."""
    return F.mse_loss(y, label)


def canonical_grads(block: MoEBlock) -> dict[str, torch.Tensor]:
    """``{name: grad}`` with expert parameters named by their global expert id
    (``expert3.w1``), so copies held by different ranks can be matched."""
    out = {}
    for name, p in block.named_parameters():
        if p.grad is None:
            continue
        if name.startswith("experts."):
            _, j, rest = name.split(".", 2)
            name = f"expert{block.expert_ids[int(j)]}.{rest}"
        out[name] = p.grad.detach().clone()
    return out


# ------------------------------------------------------------------------------ data
def make_data(cfg: MoEConfig, ep_rank: int, num_chunks: int, batch: int,
              step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels ``float32[num_chunks * batch, seq, dim]`` of one expert-parallel
    replica (each replica trains on its own data)."""
    g = torch.Generator().manual_seed(cfg.seed * 7_777 + 1_000 * step + 31 * ep_rank + 5)
    shape = (num_chunks * batch, cfg.seq, cfg.dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.5


def emulate_all_to_all(sends: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What ``all_to_all_single`` with equal splits returns on every rank, in one process
    (differentiable): rank ``j`` gets chunk ``j`` of every rank's tensor, in rank order."""
    p = len(sends)
    chunks = [s.chunk(p) for s in sends]
    return [torch.cat([chunks[i][j] for i in range(p)]) for j in range(p)]


def reference(cfg: MoEConfig, ep_size: int, num_stages: int, num_chunks: int, batch: int,
              step: int = 0) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Single process, the whole expert group emulated: every micro-batch through all
    stages with the same kernels on the same shapes as the distributed run.

    Returns ``(losses, grads)``: ``losses[e]`` ``float[num_chunks]`` of replica ``e``;
    ``grads[stage]`` the canonical gradients summed over the replicas (replicated
    weights) or from the owning rank (experts).  Runs with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blocks = [[MoEBlock(cfg, s, ExpertGroup(size=ep_size, rank=e)) for e in range(ep_size)]
                  for s in range(num_stages)]
        data = [make_data(cfg, e, num_chunks, batch, step) for e in range(ep_size)]
        losses: list[list[torch.Tensor]] = [[] for _ in range(ep_size)]
        for m in range(num_chunks):
            sl = slice(m * batch, (m + 1) * batch)
            xs = [data[e][0][sl] for e in range(ep_size)]
            for s in range(num_stages):
                routed = [blocks[s][e].attn_route(xs[e]) for e in range(ep_size)]
                recv = emulate_all_to_all([r[1] for r in routed])
                outs = [blocks[s][e].run_experts(routed[e][0], recv[e], routed[e][2])[1]
                        for e in range(ep_size)]
                back = emulate_all_to_all(outs)
                xs = [blocks[s][e].reduce(routed[e][0], back[e], routed[e][2])
                      for e in range(ep_size)]
            ls = [criterion(xs[e], data[e][1][sl]) for e in range(ep_size)]
            torch.stack(ls).sum().backward()
            for e in range(ep_size):
                losses[e].append(ls[e].detach())
        grads: dict[int, dict[str, torch.Tensor]] = {}
        for s in range(num_stages):
            acc: dict[str, torch.Tensor] = {}
            for e in range(ep_size):
                for k, g in canonical_grads(blocks[s][e]).items():
                    acc[k] = acc[k] + g if k in acc else g
            grads[s] = acc
        return [torch.stack(x) for x in losses], grads
    finally:
        torch.set_num_threads(threads)




# ------------------------------------------------------------------------------ ranks
def schedule_name(pp: int) -> str:
    """The schedule the example runs on ``pp`` pipeline ranks: DualPipe, or ``fb-only``
    (overlapped F&B with no pipeline) on one."""
    return "fb-only" if pp == 1 else "dualpipe"


def fb_window_stats(sub: list, rt: list) -> list[dict]:
    """Hidden-communication figures of every F&B pair of one rank's step: the sub-stage
    spans inside each ``sub.fb`` window, labelled with the runtime's F&B action."""
    from dualpipe.simulate import Interval
    ivs = [Interval(0, a, b, lab, lane) for (a, b, lab, lane) in sub]
    fb_actions = [(a, b, t) for (a, b, t, lane) in rt if lane == "compute" and "+" in t]
    wins = [w for w in windows(ivs, FB_WINDOW_LANE) if w[2] > w[1]]
    out = []
    for (_lab, s, e), st in zip(wins, overlap_per_window(
            ivs, wins, compute_lanes=(SUBSTAGE_COMPUTE_LANE,),
            comm_lanes=(SUBSTAGE_COMM_LANE,))):
        d = st.to_json()
        mid = (s + e) / 2
        d["action"] = next((t for (a, b, t) in fb_actions if a <= mid <= b), "F&B")
        d["start_s"], d["end_s"] = s, e
        out.append(d)
    return out


def rank_main(rank: int, world: int, opts: dict) -> dict:
    """One rank of the 2-D mesh: build the groups, then for every (order, delay) run a
    warm-up step and ``steps`` measured steps of DualPipe (``fb-only`` when ``pp`` is 1);
    return what the parent checks and draws."""
    from torch.distributed.device_mesh import init_device_mesh

    from dualpipe import Pipeline
    from dualpipe.schedules import get_schedule

    pp, ep = opts["pp"], opts["ep"]
    if pp * ep != world:
        raise ValueError(f"pp x ep = {pp} x {ep} must equal the world size {world}")
    mesh = init_device_mesh("cpu", (pp, ep), mesh_dim_names=("pp", "ep"))
    pp_group, ep_group = mesh.get_group("pp"), mesh.get_group("ep")
    pp_rank, ep_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("ep")
    cfg = MoEConfig(**opts["cfg"])
    n, mb = opts["chunks"], opts["batch"]
    name = schedule_name(pp)
    sched = get_schedule(name, pp, n)
    x, y = make_data(cfg, ep_rank, n, mb)
    half = n // 2 * mb
    if pp == 1:  # no pipeline: this rank feeds every micro-batch and computes every loss
        inputs, labels, loss_mbs = (x,), (y,), list(range(n))
    elif pp_rank == 0:  # DualPipe: rank 0 feeds the first half, computes the second's loss
        inputs, labels, loss_mbs = (x[:half],), (y[half:],), list(range(n // 2, n))
    elif pp_rank == pp - 1:
        inputs, labels, loss_mbs = (x[half:],), (y[:half],), list(range(n // 2))
    else:
        inputs, labels, loss_mbs = (), (), []
    crit = criterion if labels else None
    runs = []
    for order in opts["orders"]:
        for delay_ms in opts["delays_ms"]:
            group = ExpertGroup(ep_group, comm_delay_s=delay_ms / 1e3)
            mods = [MoEBlock(cfg, stage, group).configure_overlap(
                order=COMBINE_EARLY_ORDER if order == "combine-early" else order)
                for (_st, stage) in sched.placement[pp_rank]]
            pipe = Pipeline(mods, schedule=name, process_group=pp_group,
                            timeout=opts["timeout"])
            pipe.step(*inputs, num_chunks=n, criterion=crit, labels=labels)  # warm-up
            runs.append({"order": order, "delay_ms": delay_ms, "pipe": pipe, "mods": mods,
                         "steps": []})
    # measured steps: the runs take turns, so slow drifts of the machine hit all alike
    for _ in range(opts["steps"]):
        for run in runs:
            pipe = run["pipe"]
            for m in run["mods"]:
                m.zero_grad(set_to_none=True)
            tl = Timeline(rank=pp_rank)
            with tl.activate():
                t0 = tl.now()
                loss, _ = pipe.step(*inputs, num_chunks=n, criterion=crit, labels=labels)
            sub = [(iv.start - t0, iv.end - t0, str(iv.action), iv.lane)
                   for iv in tl.intervals()]
            rt = [(iv.start, iv.end, str(iv.action), iv.lane) for iv in pipe.timeline]
            run["steps"].append({"wall_s": pipe.last_stats.wall, "sub": sub, "rt": rt,
                                 "windows": fb_window_stats(sub, rt)})
            run["loss"] = loss
    for run in runs:  # gradients of the last step (the same every step: no update)
        run["grads"] = {stage: canonical_grads(m)
                        for m, (_st, stage) in zip(run.pop("mods"), sched.placement[pp_rank])}
        del run["pipe"]
    return {"pp_rank": pp_rank, "ep_rank": ep_rank, "loss_mbs": loss_mbs, "runs": runs}


# ------------------------------------------------------------------------------ parent
def _summary_of_windows(steps: list[dict]) -> dict:
    ws = [w for s in steps for w in s["windows"]]
    comm = sum(w["comm_s"] for w in ws)
    hidden = sum(w["hidden_s"] for w in ws)
    fr = [w["hidden_fraction"] for w in ws if w["comm_s"] > 0]
    return {"pairs": len(ws), "comm_s": comm, "hidden_s": hidden,
            "hidden_fraction": hidden / comm if comm > 0 else 1.0,
            "median_pair_fraction": statistics.median(fr) if fr else None,
            "min_pair_fraction": min(fr) if fr else None,
            "mean_pair_wall_s": statistics.mean(w["wall_s"] for w in ws) if ws else None,
            "mean_pair_compute_s": statistics.mean(w["compute_s"] for w in ws) if ws else None,
            "median_step_wall_s": statistics.median(s["wall_s"] for s in steps)}


def check_numerics(results: list[dict], ref: tuple | None) -> dict:
    """Overlapped orders against ``sequential`` (per rank: losses bitwise, gradients
    cosine < 1e-13, and whether they are bitwise too), and every run against the
    single-process reference ``ref`` when given."""
    out: dict[str, Any] = {"vs_sequential": [], "vs_reference": []}
    for r in results:
        by = {(run["order"], run["delay_ms"]): run for run in r["runs"]}
        for (order, delay), run in by.items():
            base = by.get(("sequential", delay))
            if base is None or order == "sequential":
                continue
            loss_eq = (run["loss"] is None and base["loss"] is None) or \
                torch.equal(run["loss"], base["loss"])
            worst, bitwise = 0.0, True
            for stage, gs in run["grads"].items():
                for k, g in gs.items():
                    worst = max(worst, cosine_distance(g, base["grads"][stage][k]))
                    bitwise &= torch.equal(g, base["grads"][stage][k])
            out["vs_sequential"].append({"pp": r["pp_rank"], "ep": r["ep_rank"],
                                         "order": order, "delay_ms": delay,
                                         "loss_bitwise": loss_eq, "grad_cos_max": worst,
                                         "grad_bitwise": bitwise})
    if ref is not None:
        ref_losses, ref_grads = ref
        orders = {(run["order"], run["delay_ms"]) for run in results[0]["runs"]}
        for key in sorted(orders):
            loss_eq = True
            total: dict[int, dict[str, torch.Tensor]] = {}
            for r in results:
                run = next(x for x in r["runs"] if (x["order"], x["delay_ms"]) == key)
                if run["loss"] is not None:
                    want = ref_losses[r["ep_rank"]][r["loss_mbs"]]
                    loss_eq &= torch.equal(run["loss"], want)
                for stage, gs in run["grads"].items():
                    acc = total.setdefault(stage, {})
                    for k, g in gs.items():
                        acc[k] = acc[k] + g if k in acc else g.clone()
            worst = max(cosine_distance(total[s][k], g)
                        for s, gs in ref_grads.items() for k, g in gs.items())
            missing = [f"{s}:{k}" for s, gs in ref_grads.items() for k in gs
                       if k not in total.get(s, {})]
            out["vs_reference"].append({"order": key[0], "delay_ms": key[1],
                                        "loss_bitwise": loss_eq, "grad_cos_max": worst,
                                        "missing": missing})
    return out


def draw_timeline(results: list[dict], order: str, delay_ms: float, ep_rank: int,
                  chunks: int, path_stem: str,
                  formats: Sequence[str] = ("png", "json")) -> list[str]:
    """Draw the last measured step of one expert replica (its pipeline ranks): the
    runtime's actions (lanes ``compute``/``wait``) plus the sub-stage spans (lanes
    ``sub.compute``/``sub.comm``), as ``path_stem.png`` (image) and ``path_stem.json``
    (Chrome/Perfetto trace), times in seconds.  Returns the files written."""
    from dualpipe.draw import draw
    from dualpipe.schedules import get_schedule, parse_action
    from dualpipe.simulate import Interval
    pp = max(r["pp_rank"] for r in results) + 1
    ivs = []
    for r in results:
        if r["ep_rank"] != ep_rank:
            continue
        run = next(x for x in r["runs"] if x["order"] == order and x["delay_ms"] == delay_ms)
        st = run["steps"][-1]
        for (a, b, t, lane) in st["rt"]:
            ivs.append(Interval(r["pp_rank"], a, b, parse_action(t), lane))
        for (a, b, lab, lane) in st["sub"]:
            if lane in (SUBSTAGE_COMPUTE_LANE, SUBSTAGE_COMM_LANE):
                ivs.append(Interval(r["pp_rank"], a, b, lab, lane))
    s = get_schedule(schedule_name(pp), pp, chunks)
    ep = len({r["ep_rank"] for r in results})
    title = (f"MoE block, {s.name}: expert replica {ep_rank} of {pp}x{ep} (pp x ep), "
             f"{order}, a2a delay {delay_ms:g} ms")
    files = [f"{path_stem}.{fmt}" for fmt in formats]
    for f in files:
        draw(f, ivs, s, title=title, time_unit="s")
    return files


def draw_pair(results: list[dict], order: str, delay_ms: float, chunks: int, path: str,
              pair: int = 1, pp_rank: int = 0, ep_rank: int = 0) -> str:
    """Draw one F&B pair (the ``pair``-th of the last measured step on that rank) with
    its sub-stage spans: a close-up of what :func:`draw_timeline` shows.  ``path`` ends
    in ``.png`` or ``.json``.  Returns ``path``."""
    from dualpipe.draw import draw
    from dualpipe.schedules import get_schedule, parse_action
    from dualpipe.simulate import Interval
    r = next(x for x in results if x["pp_rank"] == pp_rank and x["ep_rank"] == ep_rank)
    run = next(x for x in r["runs"] if x["order"] == order and x["delay_ms"] == delay_ms)
    st = run["steps"][-1]
    if not st["windows"]:
        raise ValueError(f"rank (pp {pp_rank}, ep {ep_rank}) ran no F&B pair")
    w = st["windows"][min(pair, len(st["windows"]) - 1)]
    lo, hi = w["start_s"], w["end_s"]
    ivs = [Interval(0, a - lo, b - lo, parse_action(t), lane) for (a, b, t, lane) in st["rt"]
           if lane == "compute" and t == w["action"]]
    ivs += [Interval(0, a - lo, b - lo, lab, lane) for (a, b, lab, lane) in st["sub"]
            if lane in (SUBSTAGE_COMPUTE_LANE, SUBSTAGE_COMM_LANE) and lo <= a <= hi]
    pp = max(x["pp_rank"] for x in results) + 1
    draw(path, ivs, get_schedule(schedule_name(pp), pp, chunks), time_unit="s",
         title=f"one F&B pair ({w['action']}, pipeline rank {pp_rank}), {order}, a2a delay "
               f"{delay_ms:g} ms: hidden {w['hidden_fraction']:.0%}")
    return path


def _print_pairs(results: list[dict], order: str, delay_ms: float) -> None:
    print(f"  per F&B pair (order {order}, delay {delay_ms:g} ms; last measured step):")
    print("    rank(pp,ep)  action        wall ms  comm ms  hidden ms  hidden")
    for r in sorted(results, key=lambda r: (r["ep_rank"], r["pp_rank"])):
        run = next(x for x in r["runs"] if x["order"] == order and x["delay_ms"] == delay_ms)
        for w in run["steps"][-1]["windows"]:
            print(f"    ({r['pp_rank']},{r['ep_rank']})        {w['action']:<12} "
                  f"{w['wall_s'] * 1e3:7.2f}  {w['comm_s'] * 1e3:7.2f}  "
                  f"{w['hidden_s'] * 1e3:9.2f}  {w['hidden_fraction']:6.1%}")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2,
                   help="pipeline ranks: even (DualPipe), or 1 (no pipeline: fb-only)")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel ranks")
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per step")
    p.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--delay-ms", type=float, nargs="*", default=[0.0, 2.0],
                   help="artificial all-to-all latencies to run, ms (0 = real gloo only)")
    p.add_argument("--orders", nargs="*", default=["combine-early", "alternate", "sequential"],
                   help="F&B orders: combine-early (this example's), alternate (DeepSeek's "
                        "rule), sequential (no overlap, the baseline)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per run")
    p.add_argument("--out", default="out/moe", help="directory for PNG, trace and JSON")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the single-process reference check")
    p.add_argument("--no-draw", action="store_true", help="do not draw timelines")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    a = p.parse_args(argv)
    if a.pp != 1 and (a.pp < 2 or a.pp % 2):
        p.error(f"--pp must be 1 (no pipeline) or an even number >= 2 (DualPipe), got {a.pp}")
    if a.pp == 1 and a.chunks < 2:
        p.error(f"--chunks must be >= 2 with --pp 1 (an F&B pair needs two micro-batches), "
                f"got {a.chunks}")
    if a.pp > 1 and (a.chunks < 2 * a.pp or a.chunks % 2):
        p.error(f"--chunks must be even and >= 2 * pp = {2 * a.pp}, got {a.chunks}")
    if "sequential" not in a.orders:
        p.error("--orders must include 'sequential' (the baseline the checks compare with)")
    if a.steps < 1:
        p.error("--steps must be >= 1")
    cfg = MoEConfig(dim=a.dim, heads=a.heads, seq=a.seq, ffn=a.ffn, num_experts=a.experts,
                    top_k=a.top_k, capacity_factor=a.capacity_factor)
    if cfg.num_experts % a.ep:
        p.error(f"--experts ({a.experts}) must be divisible by --ep ({a.ep})")
    opts = {"pp": a.pp, "ep": a.ep, "chunks": a.chunks, "batch": a.batch, "cfg": asdict(cfg),
            "orders": list(a.orders), "delays_ms": list(a.delay_ms), "steps": a.steps,
            "timeout": a.timeout}
    from dualpipe.launch import run_ranks
    t0 = time.perf_counter()
    results = run_ranks(rank_main, a.pp * a.ep, opts, timeout=a.timeout)
    t_run = time.perf_counter() - t0
    ref = None if a.no_reference else reference(cfg, a.ep, a.pp, a.chunks, a.batch)
    checks = check_numerics(results, ref)
    how = "DualPipe" if a.pp > 1 else "fb-only (no pipeline)"
    print(f"MoE block under {how}: {a.pp} pipeline x {a.ep} expert-parallel gloo ranks, "
          f"{a.chunks} micro-batches of [{a.batch}, {a.seq}, {a.dim}], {a.experts} experts "
          f"top-{a.top_k}, capacity {cfg.capacity(a.batch * a.seq)} ({t_run:.1f} s)")
    print("numerics:")
    for c in checks["vs_sequential"]:
        print(f"  rank (pp {c['pp']}, ep {c['ep']}) {c['order']:>13} vs sequential, delay "
              f"{c['delay_ms']:g} ms: losses bitwise {c['loss_bitwise']}, gradients bitwise "
              f"{c['grad_bitwise']}, max cosine distance {c['grad_cos_max']:.1e}")
    for c in checks["vs_reference"]:
        print(f"  {c['order']:>13} (delay {c['delay_ms']:g} ms) vs single-process reference: "
              f"losses bitwise {c['loss_bitwise']}, max gradient cosine distance "
              f"{c['grad_cos_max']:.1e}")
    ok = all(c["loss_bitwise"] and c["grad_cos_max"] < 1e-13 for c in checks["vs_sequential"])
    ok &= all(c["grad_cos_max"] < 1e-13 and not c["missing"] for c in checks["vs_reference"])
    summary: dict[str, Any] = {"config": opts, "numerics_ok": ok, "checks": checks, "runs": []}
    print("overlap (F&B pairs of all ranks, measured steps; hidden = comm time during "
          "sub-stage compute):")
    for order in a.orders:
        for d in a.delay_ms:
            steps = [st for r in results for run in r["runs"]
                     if run["order"] == order and run["delay_ms"] == d for st in run["steps"]]
            s = _summary_of_windows(steps)
            s.update(order=order, delay_ms=d)
            summary["runs"].append(s)
            print(f"  {order:>13}, delay {d:g} ms: hidden fraction {s['hidden_fraction']:6.1%}"
                  f" (median pair {s['median_pair_fraction']:.1%}), comm {s['comm_s'] * 1e3:7.1f}"
                  f" ms, mean F&B {s['mean_pair_wall_s'] * 1e3:6.2f} ms, median step "
                  f"{s['median_step_wall_s'] * 1e3:6.1f} ms")
    by = {(s["order"], s["delay_ms"]): s for s in summary["runs"]}
    for order in a.orders:
        if order == "sequential":
            continue
        for d in a.delay_ms:
            ov, sq = by[(order, d)], by[("sequential", d)]
            if sq["comm_s"] > 0 and sq["pairs"]:
                saved = (sq["mean_pair_wall_s"] - ov["mean_pair_wall_s"]) * ov["pairs"]
                iso = saved / (sq["comm_s"] * ov["pairs"] / sq["pairs"])
                slow = ov["mean_pair_compute_s"] / sq["mean_pair_compute_s"]
                ov["isolated_hidden_fraction"] = iso
                ov["compute_slowdown"] = slow
                print(f"  {order:>13}, delay {d:g} ms: an F&B pair takes "
                      f"{(sq['mean_pair_wall_s'] - ov['mean_pair_wall_s']) * 1e3:.2f} ms less "
                      f"than in sequential order = {iso:.1%} of the sequential pair's "
                      f"communication; compute slowdown {slow:.2f}x")
    if any(d == 0 for d in a.delay_ms):
        _print_pairs(results, a.orders[0], 0.0)
    if any(d > 0 for d in a.delay_ms):
        _print_pairs(results, a.orders[0], max(a.delay_ms))
    os.makedirs(a.out, exist_ok=True)
    if not a.no_draw:
        files = []
        for d in a.delay_ms:
            for order in (a.orders[0], "sequential"):
                stem = os.path.join(a.out, f"timeline_{order}_delay{d:g}ms")
                files += draw_timeline(results, order, d, 0, a.chunks, stem)
        for d in a.delay_ms:
            for order in (a.orders[0], "sequential"):
                files.append(draw_pair(results, order, d, a.chunks, os.path.join(
                    a.out, f"pair_{order}_delay{d:g}ms.png")))
        summary["files"] = files
        print("timelines: " + ", ".join(files))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"summary: {os.path.join(a.out, 'summary.json')}")
    print("checks passed" if ok else "CHECKS FAILED")
    summary["results"] = results
    return summary


if __name__ == "__main__":
    out = main()
    sys.exit(0 if out["numerics_ok"] else 1)
