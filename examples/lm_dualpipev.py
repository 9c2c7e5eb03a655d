"""A small decoder-only language model trained with DualPipeV on CPU ranks.

Run from the repository root::

    python examples/lm_dualpipev.py                 # 2 gloo ranks = 4 stages, 30 steps
    python examples/lm_dualpipev.py --ranks 1 --tie # both stages on one rank, tied head
    python examples/lm_dualpipev.py --help

What it shows
-------------
* **Language-model stages.**  Stage 0 takes ``int64`` token ids (an embedding), the
  last stage returns ``float32[batch, seq, vocab]`` logits and a cross-entropy criterion
  takes ``int64`` labels (``-100`` on padding).  Between the stages travel, next to the
  ``float32[batch, seq, dim]`` hidden states, a ``bool[batch, seq]`` padding mask and
  ``int64[batch, seq]`` position ids, which every block passes through unchanged
  (``return h, mask, pos``) -- the runtime sends them without freeing them under
  autograd's feet.
* **The blocks**: RMSNorm, causal self-attention with rotary position embeddings from
  the position ids (padded keys masked), a SwiGLU MLP; one block per stage.  The head is
  untied by default; ``--tie`` ties it to the embedding the way pipelines tie weights
  across stages (two copies kept equal, each given the sum of both gradients).  Under
  DualPipeV the first and the last stage live on rank 0, so the tie is local there.
* **The sequence length changes from step to step** (``--seq-lens``, cycled): the
  runtime exchanges the new boundary shapes, nothing stale is reused.
* **Numerics**: the same micro-batches through the same stages in one process, with the
  same optimizer (AdamW, per-parameter kernels): the per-micro-batch losses of every
  step are checked **bit for bit** against the pipeline's.  The loss falls.

The text is synthetic (a small grammar, nothing downloaded), generated from ``--seed``
and the step number in every process alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python examples/lm_dualpipev.py` from a checkout
    sys.path.insert(0, _ROOT)

PAD, BOS, IGNORE = 0, 1, -100

# --------------------------------------------------------------------------- the text

_GRAMMAR = {
    "det": ["the", "a", "every", "one"],
    "adj": ["red", "small", "fast", "quiet", "old", "bright"],
    "noun": ["cat", "dog", "bird", "pipe", "rank", "stage", "river", "stone"],
    "verb": ["sees", "likes", "sends", "holds", "follows", "waits for"],
    "prep": ["near", "under", "behind", "with"],
}
VOCAB = ["<pad>", "<bos>", ".", "and"] + sorted(
    {w for words in _GRAMMAR.values() for phrase in words for w in phrase.split()})
_INDEX = {w: i for i, w in enumerate(VOCAB)}


def _sentence(g: torch.Generator) -> list[str]:
    def pick(kind):
        words = _GRAMMAR[kind]
        return words[int(torch.randint(len(words), (1,), generator=g))].split()

    def coin(p):
        return float(torch.rand(1, generator=g)) < p

    def noun_phrase():
        out = pick("det") + (pick("adj") if coin(0.5) else []) + pick("noun")
        if coin(0.25):
            out += pick("prep") + pick("det") + pick("noun")
        return out

    s = noun_phrase() + pick("verb") + noun_phrase()
    if coin(0.2):
        s += ["and"] + pick("verb") + noun_phrase()
    return s + ["."]


def make_batch(seed: int, step: int, rows: int, seq: int):
    """``rows`` right-padded sequences for ``step``: ids ``int64[rows, seq]`` (``<bos>``
    then sentences, each row at least half the length) and next-token labels
    ``int64[rows, seq]`` (``-100`` where the next token is padding)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    ids = torch.full((rows, seq), PAD, dtype=torch.int64)
    labels = torch.full((rows, seq), IGNORE, dtype=torch.int64)
    for r in range(rows):
        n = seq // 2 + int(torch.randint(seq - seq // 2, (1,), generator=g)) + 1  # tokens + 1
        toks = [BOS]
        while len(toks) < n:
            toks += [_INDEX[w] for w in _sentence(g)]
        toks = torch.tensor(toks[:n])
        ids[r, : n - 1] = toks[:-1]
        labels[r, : n - 1] = toks[1:]
    return ids, labels


# --------------------------------------------------------------------------- the model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotary(x, pos, base: float = 10000.0):
    """Rotary position embedding of ``x [B, H, S, Dh]`` at positions ``pos int64[B, S]``."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
    ang = pos[:, None, :, None].float() * freq                      # [B, 1, S, half]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention (rotary, padded keys masked) and a
    SwiGLU MLP.  ``(h float32[B, S, D], mask bool[B, S], pos int64[B, S])`` in and out;
    ``mask`` and ``pos`` are returned unchanged for the next stage."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, h, mask, pos):
        B, S, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, S, 3, self.heads, D // self.heads) \
            .permute(2, 0, 3, 1, 4)
        q, k = _rotary(q, pos), _rotary(k, pos)
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        allowed = causal & mask[:, None, None, :]                  # [B, 1, S, S]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + self.proj(a.transpose(1, 2).reshape(B, S, D))
        x = self.norm2(h)
        h = h + self.w2(F.silu(self.w1(x)) * self.w3(x))
        return h, mask, pos


class FirstStage(nn.Module):
    """Token ids ``int64[B, S]`` -> embedding -> block -> ``(h, mask, pos)``."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["dim"])
        self.block = Block(cfg["dim"], cfg["heads"], cfg["ffn"])

    def forward(self, ids):
        mask = ids != PAD
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        return self.block(self.embed(ids), mask, pos)


class LastStage(nn.Module):
    """``(h, mask, pos)`` -> block -> RMSNorm -> head -> logits ``float32[B, S, V]``."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.block = Block(cfg["dim"], cfg["heads"], cfg["ffn"])
        self.norm = RMSNorm(cfg["dim"])
        self.head = nn.Linear(cfg["dim"], cfg["vocab"], bias=False)

    def forward(self, h, mask, pos):
        h, _, _ = self.block(h, mask, pos)
        return self.head(self.norm(h))


class MiddleStage(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.block = Block(cfg["dim"], cfg["heads"], cfg["ffn"])

    def forward(self, h, mask, pos):
        return self.block(h, mask, pos)


def make_stage(stage: int, cfg: dict) -> nn.Module:
    """Stage ``stage`` of ``cfg["stages"]``, its weights a function of (seed, stage) only
    (the tied head starts as a copy of the embedding)."""
    torch.manual_seed(cfg["seed"] * 1000 + stage)
    n = cfg["stages"]
    if stage == 0:
        m = FirstStage(cfg)
    elif stage == n - 1:
        m = LastStage(cfg)
    else:
        m = MiddleStage(cfg)
    if cfg["tie"] and stage in (0, n - 1):
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + 999)
        w = torch.randn(cfg["vocab"], cfg["dim"], generator=g) * 0.1
        with torch.no_grad():
            (m.embed if stage == 0 else m.head).weight.copy_(w)
    return m


def lm_loss(logits, labels):
    """Mean next-token cross entropy over the non-padding tokens of a micro-batch."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def tie_grads(embed: nn.Embedding, head: nn.Linear) -> None:
    """Give both copies of the tied weight the sum of their gradients (same order in the
    pipeline and in the reference: embedding's, then head's), so they stay equal."""
    g = embed.weight.grad + head.weight.grad
    embed.weight.grad.copy_(g)
    head.weight.grad.copy_(g)


def make_optimizer(params, cfg: dict):
    # foreach=False: the same per-parameter kernels on the ranks and in the reference
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01, foreach=False)


def seq_len(cfg: dict, step: int) -> int:
    return cfg["seq_lens"][step % len(cfg["seq_lens"])]


# --------------------------------------------------------------------------- the runs

def rank_main(rank: int, world: int, cfg: dict) -> dict:
    """One rank: DualPipeV over stages ``rank`` and ``2R-1-rank``; rank 0 feeds the ids
    and labels and gets the per-micro-batch losses."""
    from dualpipe import DualPipeV
    n = cfg["stages"]
    stages = nn.Sequential(make_stage(rank, cfg), make_stage(n - 1 - rank, cfg))
    pipe = DualPipeV(stages, timeout=cfg["timeout"])
    opt = make_optimizer(pipe.parameters(), cfg)
    rows = cfg["chunks"] * cfg["batch"]
    losses, walls = [], []
    for step in range(cfg["steps"]):
        ids = labels = None
        if rank == 0:
            ids, labels = make_batch(cfg["seed"], step, rows, seq_len(cfg, step))
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = pipe.step(ids, num_chunks=cfg["chunks"], criterion=lm_loss, labels=(labels,))
        walls.append(time.perf_counter() - t0)
        if cfg["tie"] and rank == 0:
            tie_grads(stages[0].embed, stages[1].head)
        opt.step()
        losses.append(loss)
    return {"rank": rank, "losses": losses, "step_s": walls, "transport": pipe.transport}


def reference(cfg: dict) -> list[torch.Tensor]:
    """The same micro-batches through all stages in one process (one thread, as the
    ranks run), the same optimizer: per step the per-micro-batch losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = [make_stage(s, cfg) for s in range(cfg["stages"])]
        opt = make_optimizer([p for m in stages for p in m.parameters()], cfg)
        rows, out = cfg["chunks"] * cfg["batch"], []
        for step in range(cfg["steps"]):
            ids, labels = make_batch(cfg["seed"], step, rows, seq_len(cfg, step))
            opt.zero_grad(set_to_none=True)
            losses = []
            for x, y in zip(ids.chunk(cfg["chunks"]), labels.chunk(cfg["chunks"])):
                h = (x,)
                for m in stages:
                    h = m(*h)
                    h = (h,) if isinstance(h, torch.Tensor) else h
                loss = lm_loss(*h, y)
                loss.backward()
                losses.append(loss.detach())
            if cfg["tie"]:
                tie_grads(stages[0].embed, stages[-1].head)
            opt.step()
            out.append(torch.stack(losses))
        return out
    finally:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="pipeline ranks (2 stages each)")
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per step (>= 2 ranks)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32, 24, 40],
                   help="sequence length of each step, cycled")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--tie", action="store_true", help="tie the head to the embedding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the single-process run and its bitwise check")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    a = p.parse_args(argv)
    if a.ranks < 1:
        p.error(f"--ranks must be >= 1, got {a.ranks}")
    if a.chunks < 2 * a.ranks:
        p.error(f"--chunks must be >= 2 * ranks = {2 * a.ranks} (DualPipeV), got {a.chunks}")
    if a.dim % a.heads or (a.dim // a.heads) % 2:
        p.error("--dim must be a multiple of --heads with an even head size (rotary)")
    if min(a.seq_lens) < 2:
        p.error("--seq-lens must be >= 2")
    cfg = {"stages": 2 * a.ranks, "chunks": a.chunks, "batch": a.batch,
           "seq_lens": list(a.seq_lens), "vocab": len(VOCAB), "dim": a.dim, "heads": a.heads,
           "ffn": a.ffn, "steps": a.steps, "lr": a.lr, "tie": a.tie, "seed": a.seed,
           "timeout": a.timeout}
    from dualpipe.launch import run_ranks
    t0 = time.perf_counter()
    results = run_ranks(rank_main, a.ranks, cfg, timeout=a.timeout)
    took = time.perf_counter() - t0
    losses = results[0]["losses"]
    ref = None if a.no_reference else reference(cfg)
    print(f"decoder-only LM under DualPipeV: {a.ranks} gloo rank(s), {cfg['stages']} stages "
          f"(embedding+block, {cfg['stages'] - 2} block(s), block+head), vocabulary "
          f"{len(VOCAB)}, dim {a.dim}, {a.chunks} micro-batches of {a.batch} sequences, "
          f"{'tied' if a.tie else 'untied'} head, transport {results[0]['transport']} "
          f"({took:.1f} s)")
    print("step  seq  loss (mean of micro-batches)  single process  bitwise")
    equal = []
    for step, loss in enumerate(losses):
        same = None if ref is None else bool(torch.equal(loss, ref[step]))
        equal.append(same)
        r = "" if ref is None else f"{float(ref[step].mean()):.6f}"
        print(f"{step:4d}  {seq_len(cfg, step):3d}  {float(loss.mean()):28.6f}  {r:>14}  "
              f"{'' if same is None else same}")
    first, last = float(losses[0].mean()), float(losses[-1].mean())
    fell = last < first
    ok = fell and all(e is not False for e in equal)
    print(f"loss {first:.3f} -> {last:.3f} ({'falls' if fell else 'does NOT fall'}); "
          + ("losses bitwise equal to the single process at every step"
             if ref is not None and all(equal) else
             "no reference run" if ref is None else "LOSSES DIFFER from the single process"))
    print("checks passed" if ok else "CHECKS FAILED")
    return {"config": cfg, "losses": losses, "reference": ref, "bitwise": equal,
            "loss_fell": fell, "ok": ok, "results": results, "seconds": took}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
