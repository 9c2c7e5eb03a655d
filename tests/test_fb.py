"""overlap.fb: sub-stage modules, the generated overlapped_forward_backward.

(a) numerics: bitwise equal to a plain forward then a plain backward;
(b) ordering: the steps follow the interleaving (DeepSeek's order for a MoE-shaped chunk);
(c) concurrency: a communication of T and a compute of T overlap (ratio reported);
plus fallbacks, errors, and a 2-rank gloo all-to-all run.
"""
import datetime
import logging
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from overlap.fb import (FB_WINDOW_LANE, SUBSTAGE_COMM_LANE, SUBSTAGE_COMPUTE_LANE, CommHandle,
                        Step, SubStage, SubStageModule, build_order, comm, compute,
                        WeightGradStore, defer_weight_grad, overlapped_forward_backward,
                        plain_forward_backward, run_async, run_substages)
from overlap.streams import StreamPair
from overlap.timeline import Timeline, overlap_stats

log = logging.getLogger(__name__)
H = 16


# -- a MoE-shaped toy: attention -> dispatch (a2a) -> experts -> combine (a2a) -------------
class LinearW(torch.autograd.Function):
    """x @ w.T whose weight gradient is deferrable (like DualPipe's example)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.param = w  # the parameter itself gets the gradient (see wgrad)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        param = ctx.param

        @torch.no_grad()
        def wgrad():
            # into the parameter object, not the saved ``w``: under activation
            # checkpointing the saved tensor is an alias, whose .grad is its own
            gw = g.flatten(0, -2).t() @ x.flatten(0, -2)
            if param.grad is None:
                param.grad = gw
            else:
                param.grad += gw

        defer_weight_grad(wgrad)
        return g @ w, None


def attn_fn(m, x):
    return x + torch.tanh(LinearW.apply(x, m.wa))


def mlp_fn(m, h):
    return h + LinearW.apply(F.gelu(h), m.wm) * 0.5


def flip(x):
    return x.flip(0)


class Toy(SubStageModule):
    """attn -> dispatch -> mlp -> combine; the 'all-to-alls' are row permutations run on a
    background thread (exact data movement, like an all-to-all)."""

    def __init__(self, split=True, delay=0.0, recompute=False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.wa = nn.Parameter(torch.randn(H, H, generator=g) / 4)
        self.wm = nn.Parameter(torch.randn(H, H, generator=g) / 4)
        self.split = split
        self.delay = delay
        self.recompute = recompute
        self.calls = []
        self.tag = ""  # prefixed to recorded calls (two toys sharing one calls list)

    def _a2a(self, name):
        def run(x):
            self.calls.append(self.tag + name)

            def work():
                if self.delay:
                    time.sleep(self.delay)
                return flip(x)
            return run_async(work)
        return run

    def _c(self, name, fn):
        def run(x):
            self.calls.append(self.tag + name)
            return fn(self, x)
        return run

    def substages(self):
        return [compute("attn", self._c("F:attn", attn_fn), split_weight_grad=self.split,
                        recompute=self.recompute),
                comm("dispatch", self._a2a("F:dispatch"), self._a2a("B:dispatch")),
                compute("mlp", self._c("F:mlp", mlp_fn), split_weight_grad=self.split,
                        recompute=self.recompute),
                comm("combine", self._a2a("F:combine"), self._a2a("B:combine"))]


class ToyRef(nn.Module):
    """The same computation as one uncut autograd graph."""

    def __init__(self, toy):
        super().__init__()
        self.wa = nn.Parameter(toy.wa.detach().clone())
        self.wm = nn.Parameter(toy.wm.detach().clone())

    def forward(self, x):
        return flip(mlp_fn(self, flip(attn_fn(self, x))))


def mse(y, label):
    return F.mse_loss(y, label)


def data(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def grads(m):
    return [p.grad for p in m.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x is not None and y is not None
        assert torch.equal(x, y), (x - y).abs().max()


# -- (a) numerics -------------------------------------------------------------------------
def test_plain_use_equals_uncut_module_bitwise():
    toy = Toy()
    ref = ToyRef(toy)
    x, lab = data(0)
    xa, xb = leaf(x), leaf(x)
    loss_ref = mse(ref(xa), lab)
    loss_ref.backward()
    loss = mse(toy(xb), lab)
    loss.backward()
    assert torch.equal(loss, loss_ref)
    assert_bitwise(grads(toy), grads(ref))
    assert torch.equal(xb.grad, xa.grad)


@pytest.mark.parametrize("last_stage", [False, True], ids=["outputs1", "loss1"])
@pytest.mark.parametrize("order", ["alternate", "sequential"])
def test_overlapped_equals_plain_forward_then_backward_bitwise(last_stage, order):
    toy0, toy1 = Toy(), Toy()
    ref0, ref1 = ToyRef(toy0), ToyRef(toy1)
    (x0, lab0), (x1, lab1) = data(1), data(2)
    g1 = torch.randn(8, H, generator=torch.Generator().manual_seed(3))

    # reference: plain forward of micro-batch 0, plain backward of micro-batch 1
    r_in1 = leaf(x1)
    r_out1 = ref1(r_in1)
    r_loss1 = mse(r_out1, lab1) if last_stage else None
    r_out0 = ref0(leaf(x0))
    r_loss0 = mse(r_out0, lab0) if last_stage else None
    if last_stage:
        r_loss1.backward()
    else:
        r_out1.backward(g1)

    # overlapped: module1's forward happened earlier, through its sub-stages
    in1 = leaf(x1)
    out1 = toy1(in1)
    loss1 = mse(out1, lab1) if last_stage else None
    in0 = leaf(x0)
    outs0, loss0 = overlapped_forward_backward(
        toy0, (in0,), mse if last_stage else None, [lab0] if last_stage else [],
        toy1, loss1, [] if last_stage else [out1], [] if last_stage else [g1], order=order)

    assert isinstance(outs0, list) and len(outs0) == 1
    assert torch.equal(outs0[0], r_out0)
    if last_stage:
        assert torch.equal(loss0, r_loss0)
        assert torch.equal(loss1, r_loss1)
    else:
        assert loss0 is None
    assert_bitwise(grads(toy1), grads(ref1))
    assert torch.equal(in1.grad, r_in1.grad)
    assert all(p.grad is None for p in toy0.parameters())  # forward only
    # the new forward is itself trainable, with the same numbers as the reference
    outs0[0].backward(g1)
    r_out0.backward(g1)
    assert_bitwise(grads(toy0), grads(ref0))


def test_same_module_both_roles_and_accumulation_over_micro_batches():
    toy, ref = Toy(), ToyRef(Toy())
    (x0, _), (x1, _), (x2, _) = data(4), data(5), data(6)
    g = torch.ones(8, H)
    o1 = toy(leaf(x1))
    outs0, _ = Toy.overlapped_forward_backward(toy, (leaf(x0),), None, [], toy, None, [o1], [g])
    Toy.overlapped_forward_backward(toy, (leaf(x2),), None, [], toy, None, outs0, [g])
    ref(leaf(x1)).backward(g)
    ref(leaf(x0)).backward(g)
    assert_bitwise(grads(toy), grads(ref))


def test_no_grad_forward_is_plain_and_zero_input_grad_stage():
    toy, ref = Toy(), ToyRef(Toy())
    x, _ = data(7)
    with torch.no_grad():
        y = toy(x)
    assert y.grad_fn is None and torch.equal(y, ref(x))
    # inputs without grad (first stage): parameters still get their gradients
    toy(x).sum().backward()
    ref(x).sum().backward()
    assert_bitwise(grads(toy), grads(ref))


# -- (b) ordering -------------------------------------------------------------------------
DEEPSEEK = ["B:combine", "F:attn", "B:mlp", "F:dispatch", "B:dispatch", "W:mlp",
            "F:mlp", "B:attn", "W:attn", "F:combine"]


def test_build_order_reproduces_deepseek():
    st = Toy().substages()
    assert [str(s) for s in build_order(st, st)] == DEEPSEEK
    nosplit = Toy(split=False).substages()
    assert [str(s) for s in build_order(nosplit, nosplit)] == [
        s for s in DEEPSEEK if not s.startswith("W")]
    assert [str(s) for s in build_order(st, st, "sequential")] == [
        "F:attn", "F:dispatch", "F:mlp", "F:combine",
        "B:combine", "B:mlp", "W:mlp", "B:dispatch", "B:attn", "W:attn"]
    assert [str(s) for s in build_order(st, ())] == ["F:attn", "F:dispatch", "F:mlp", "F:combine"]
    assert build_order(st, st, DEEPSEEK) == build_order(st, st)
    assert build_order(st, st)[0] == Step("B", 3, "combine", "comm")


def test_recorded_order_follows_interleaving():
    toy0, toy1 = Toy(), Toy()
    out1 = toy1(leaf(data(1)[0]))
    toy0.calls.clear()
    toy1.calls.clear()
    tl = Timeline()
    toy0.configure_overlap(timeline=tl)
    overlapped_forward_backward(toy0, (leaf(data(2)[0]),), None, [], toy1, None, [out1],
                                [torch.ones(8, H)])
    sub = [iv for iv in tl.intervals() if iv.lane in (SUBSTAGE_COMPUTE_LANE, SUBSTAGE_COMM_LANE)]
    assert [iv.action for iv in sub] == DEEPSEEK  # spans sorted by start
    # the functions were called in that order too (W steps call no sub-stage function)
    calls = sorted(toy0.calls + toy1.calls, key=lambda c: DEEPSEEK.index(c))
    assert [c for c in DEEPSEEK if c in calls] == calls
    assert [iv.action for iv in tl.intervals(lanes=[FB_WINDOW_LANE])] == ["F&B"]


@pytest.mark.parametrize("split", [True, False], ids=["split-W", "whole-B"])
def test_recomputed_substages_match_and_recompute_at_their_b_step(split):
    """Activation checkpointing inside the overlapped pair: numbers bitwise equal to the
    uncheckpointed pair, each recompute runs at its sub-stage's B step (so it sits
    between the forward's steps, e.g. while F:dispatch is in flight), once."""
    (x0, _), (x1, _) = data(1), data(2)
    g1 = torch.randn(8, H, generator=torch.Generator().manual_seed(3))
    results = {}
    for recompute in (False, True):
        toy0, toy1 = Toy(split, recompute=recompute), Toy(split, recompute=recompute)
        shared = []
        toy0.calls = toy1.calls = shared
        toy0.tag, toy1.tag = "0.", "1."
        in1 = leaf(x1)
        out1 = toy1(in1)
        shared.clear()
        outs0, _ = overlapped_forward_backward(toy0, (leaf(x0),), None, [], toy1, None, [out1],
                                               [g1])
        results[recompute] = (list(shared), outs0[0], grads(toy1), in1.grad)
    calls, out, g, gin = results[True]
    plain_calls, plain_out, plain_g, plain_gin = results[False]
    assert torch.equal(out, plain_out) and torch.equal(gin, plain_gin)
    assert_bitwise(g, plain_g)
    # the same calls as without recompute, plus module1's two compute sub-stages again,
    # each right where its B step is in DeepSeek's order
    assert plain_calls == ["1.B:combine", "0.F:attn", "0.F:dispatch", "1.B:dispatch", "0.F:mlp",
                           "0.F:combine"]
    assert calls == ["1.B:combine", "0.F:attn", "1.F:mlp", "0.F:dispatch", "1.B:dispatch",
                     "0.F:mlp", "1.F:attn", "0.F:combine"]
    # a plain (non-overlapped) backward recomputes too, with the same numbers
    t_plain, t_re = Toy(split), Toy(split, recompute=True)
    for t in (t_plain, t_re):
        mse(t(leaf(x0)), x1).backward()
    assert_bitwise(grads(t_re), grads(t_plain))
    with pytest.raises(ValueError, match="only compute sub-stages can be recomputed"):
        SubStage("c", "comm", lambda x: x, None, False, True)


def test_explicit_order_is_used_and_checked():
    st = Toy().substages()
    custom = ["B:combine", "F:attn", "F:dispatch", "B:mlp", "W:mlp", "B:dispatch", "F:mlp",
              "F:combine", "B:attn", "W:attn"]
    toy0, toy1 = Toy(), Toy()
    toy0.configure_overlap(order=custom)
    out1 = toy1(leaf(data(1)[0]))
    tl = Timeline()
    with tl.activate():
        overlapped_forward_backward(toy0, (leaf(data(2)[0]),), None, [], toy1, None, [out1],
                                    [torch.ones(8, H)])
    lanes = [SUBSTAGE_COMPUTE_LANE, SUBSTAGE_COMM_LANE]
    assert [iv.action for iv in tl.intervals(lanes=lanes)] == custom
    with pytest.raises(ValueError, match="missing"):
        build_order(st, st, custom[:-1])
    with pytest.raises(ValueError, match="repeated"):
        build_order(st, st, custom + ["F:attn"])
    with pytest.raises(ValueError, match="forward order"):
        build_order(st, st, custom[:1] + ["F:dispatch", "F:attn"] + custom[3:])
    with pytest.raises(ValueError, match="reverse order"):
        build_order(st, st, [s for s in DEEPSEEK if s != "B:mlp"][:4] + ["B:mlp"]
                    + [s for s in DEEPSEEK if s != "B:mlp"][4:])
    with pytest.raises(ValueError, match="comes before"):
        build_order(st, st, ["W:mlp"] + [s for s in DEEPSEEK if s != "W:mlp"])
    with pytest.raises(ValueError, match="not a step"):
        build_order(st, st, ["X:attn"])
    with pytest.raises(ValueError, match="split_weight_grad"):
        nosplit = Toy(split=False).substages()
        build_order(nosplit, nosplit, ["W:attn"])
    with pytest.raises(ValueError, match="unknown order policy"):
        build_order(st, st, "zigzag")


def test_weight_grads_run_at_their_w_step():
    seen = []

    # a compute sub-stage whose backward defers a marker closure
    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            defer_weight_grad(lambda: seen.append("W ran"))
            seen.append("B ran")
            return g

    class T2(Toy):
        def substages(self):
            st = super().substages()
            return [st[0], st[1], compute("mlp", lambda h: Mark.apply(mlp_fn(self, h)),
                                          split_weight_grad=True), st[3]]

    m0, m1 = T2(), T2()
    o1 = m1(leaf(data(1)[0]))
    tl = Timeline()
    with tl.activate():
        overlapped_forward_backward(m0, (leaf(data(2)[0]),), None, [], m1, None, [o1],
                                    [torch.ones(8, H)])
    assert seen == ["B ran", "W ran"]
    labels = [iv.action for iv in tl.intervals(lanes=[SUBSTAGE_COMPUTE_LANE])]
    assert labels.index("W:mlp") > labels.index("B:mlp")
    # plain use: the closure runs at once, inside the backward
    seen.clear()
    T2()(leaf(data(3)[0])).sum().backward()
    assert seen == ["W ran", "B ran"]


def test_weight_grad_store_interop():
    wg = pytest.importorskip("dualpipe.weight_grad")
    store = wg.WeightGradStore
    toy0, toy1 = Toy(), Toy()
    ref1 = ToyRef(toy1)
    x1 = data(1)[0]
    out1 = toy1(leaf(x1))
    # closures put into the published store inside a split sub-stage go to its W step
    store.enabled = False
    overlapped_forward_backward(toy0, (leaf(data(2)[0]),), None, [], toy1, None, [out1],
                                [torch.ones(8, H)])
    assert store.enabled is False and store.take() == []
    # a zero-bubble I action (store enabled) defers our closures into the store
    out = Toy()(leaf(x1))
    store.enabled = True
    try:
        out.backward(torch.ones(8, H))
    finally:
        store.enabled = False
    fns = store.take()
    assert len(fns) == 2
    ref1(leaf(x1)).backward(torch.ones(8, H))
    assert_bitwise(grads(toy1), grads(ref1))


def test_one_store_for_our_closures_and_the_published_ones():
    """overlap.fb and dualpipe share one WeightGradStore: a closure a custom function puts
    into it directly inside a split sub-stage runs at that sub-stage's W step (not at the
    end of the pair), and an enclosing pass's state (store on, its closures) is kept."""
    store = WeightGradStore
    wg = pytest.importorskip("dualpipe.weight_grad")
    assert wg.WeightGradStore is store  # one class, re-exported, not a second store

    class Put(torch.autograd.Function):  # the published WeightGradStore protocol
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if store.enabled:
                store.put(lambda: calls.append("put ran"))
            else:
                calls.append("put ran now")
            return g

    class T3(Toy):
        def substages(self):
            st = super().substages()
            return [st[0], st[1], compute("mlp", lambda h: Put.apply(mlp_fn(self, h)),
                                          split_weight_grad=True), st[3]]

    m0, m1 = Toy(), T3()
    calls = m0.calls  # module0's forward steps and the closure, in the order they ran
    o1 = m1(leaf(data(1)[0]))
    enclosing = [lambda: None]
    store.clear()
    store.enabled = True  # as inside a runtime's I action that already collected a closure
    store.cache = list(enclosing)
    try:
        overlapped_forward_backward(m0, (leaf(data(2)[0]),), None, [], m1, None, [o1],
                                    [torch.ones(8, H)])
        assert store.enabled is True and store.take() == enclosing
    finally:
        store.clear()
    # B:combine F:attn B:mlp F:dispatch B:dispatch W:mlp F:mlp B:attn W:attn F:combine
    assert calls == ["F:attn", "F:dispatch", "put ran", "F:mlp", "F:combine"], calls
    # outside any pass (store off) the published protocol computes at once
    calls.clear()
    T3()(leaf(data(3)[0])).sum().backward()
    assert calls == ["put ran now"]


def test_fb_code_never_names_the_dualpipe_package():
    """overlap is the lower layer: no import of dualpipe and no lookup by its name (a
    string in code) anywhere in overlap/fb; docstrings may mention it."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "overlap" / "fb"
    files = sorted(root.glob("*.py"))
    assert len(files) > 1
    found = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                  ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            names = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                names = [n.module or ""]
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                names = [n.value]
            found += [f"{path.name}:{n.lineno}: {x!r}" for x in names if "dualpipe" in x.lower()]
    assert not found, found


def test_fb_runs_with_the_dualpipe_package_blocked():
    """overlap.fb imports, defers weight gradients through its store and interleaves a pair
    with every dualpipe module unimportable."""
    code = """
import sys
sys.modules["dualpipe"] = sys.modules["dualpipe.weight_grad"] = None
import torch
from overlap.fb import (SubStageModule, WeightGradStore, comm, compute, defer_weight_grad,
                        overlapped_forward_backward, run_async)

class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        ctx.w = w
        return x * w

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        w = ctx.w
        def wgrad():
            w.grad = (g * x).sum(0) if w.grad is None else w.grad + (g * x).sum(0)
        defer_weight_grad(wgrad)
        return g * w, None

class M(SubStageModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), 2.0))
    def substages(self):
        move = lambda x: run_async(lambda: x.clone())
        return [compute("a", lambda x: Scale.apply(x, self.w), split_weight_grad=True),
                comm("c", move, move)]

m0, m1 = M(), M()
x1 = torch.ones(3, 4, requires_grad=True)
o1 = m1(x1)
overlapped_forward_backward(m0, (torch.ones(3, 4),), None, [], m1, None, [o1],
                            [torch.ones(3, 4)])
assert torch.equal(m1.w.grad, torch.full((4,), 3.0)) and torch.equal(x1.grad, o1 * 0 + 2)
WeightGradStore.enabled = True  # an I pass: the closure waits in the store
x = torch.ones(3, 4, requires_grad=True)
M()(x).sum().backward()
WeightGradStore.enabled = False
assert len(WeightGradStore.take()) == 1
assert "dualpipe.weight_grad" not in [n for n, m in sys.modules.items() if m is not None]
print("ok")
"""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


# -- (c) concurrency ----------------------------------------------------------------------
def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Slow(SubStageModule):
    """One compute sub-stage of T (forward) and one comm sub-stage whose backward takes T."""

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.w = nn.Parameter(torch.ones(4))

    def substages(self):
        def work(x):
            busy(self.t)
            return x * self.w

        def xfer_bwd(g):
            def run():
                time.sleep(self.t)
                return g.clone()
            return run_async(run)

        return [compute("work", work),
                comm("xfer", lambda y: CommHandle.ready(y.clone()), xfer_bwd)]


def test_comm_and_compute_overlap():
    T = 0.15
    m0, m1 = Slow(T), Slow(T)

    def pair(order):
        out1 = m1(torch.ones(4, requires_grad=True))  # its forward also takes T (not timed)
        tl = Timeline()
        t0 = time.perf_counter()
        overlapped_forward_backward(m0, (torch.ones(4, requires_grad=True),), None, [], m1,
                                    None, [out1], [torch.ones(4)], order=order, timeline=tl)
        return time.perf_counter() - t0, tl

    pair("alternate")  # warm the thread pool
    serial, _ = pair("sequential")
    both, tl = pair("alternate")
    ratio = both / T
    stats = overlap_stats(tl.intervals(), compute_lanes=(SUBSTAGE_COMPUTE_LANE,),
                          comm_lanes=(SUBSTAGE_COMM_LANE,))
    msg = (f"overlap: T={T:.3f}s, overlapped {both:.3f}s = {ratio:.2f} T, sequential "
           f"{serial:.3f}s = {serial / T:.2f} T, hidden fraction {stats.hidden_fraction:.2f}")
    log.warning(msg)
    print(msg)
    assert ratio < 1.6, msg
    assert serial > 1.8 * T, msg
    assert stats.hidden_fraction > 0.6, msg


# -- fallbacks and errors -----------------------------------------------------------------
class PlainStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def test_fallbacks_keep_the_contract(caplog):
    # module0 without sub-stages: plain forward then backward
    p0, p1 = PlainStage(), PlainStage()
    x1 = leaf(data(1)[0])
    o1 = p1(x1)
    outs, loss = overlapped_forward_backward(p0, [leaf(data(2)[0])], None, [], p1, None, [o1],
                                             [torch.ones(8, H)])
    assert loss is None and outs[0].shape == (8, H) and x1.grad is not None
    # module1 without sub-stages: forward interleaved with nothing, then plain backward
    toy = Toy()
    x1 = leaf(data(1)[0])
    o1 = p1(x1)
    with caplog.at_level(logging.DEBUG, logger="overlap.fb"):
        outs, _ = overlapped_forward_backward(toy, [leaf(data(2)[0])], None, [], p1, None, [o1],
                                              [torch.ones(8, H)])
    assert x1.grad is not None and "without overlap" in caplog.text
    # loss path where the stage inputs are not leaves: plain backward, same numbers
    toy1, ref1 = Toy(), None
    ref1 = ToyRef(toy1)
    a, ar = leaf(data(3)[0]), leaf(data(3)[0])
    lab = data(3)[1]
    loss1 = mse(toy1(a * 2), lab)
    overlapped_forward_backward(Toy(), [leaf(data(2)[0])], None, [], toy1, loss1, [], [])
    mse(ref1(ar * 2), lab).backward()
    assert torch.equal(a.grad, ar.grad)
    assert_bitwise(grads(toy1), grads(ref1))
    # nothing to backpropagate
    outs, _ = overlapped_forward_backward(Toy(), [leaf(data(2)[0])], None, [], Toy(), None, [], [])
    assert len(outs) == 1
    # plain_forward_backward is the published example's semantics
    p0 = PlainStage()
    outs, loss = plain_forward_backward(p0, [data(2)[0]], mse, [data(2)[1]], p1, None, [], [])
    assert loss.ndim == 0


def test_second_backward_raises():
    y = Toy()(leaf(data(1)[0]))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        y.sum().backward()


def test_user_errors_say_what_to_change():
    class Bad(SubStageModule):
        def __init__(self, st):
            super().__init__()
            self.st = st

        def substages(self):
            return self.st

    x = data(1)[0]
    with pytest.raises(NotImplementedError, match="substages"):
        SubStageModule()(x)
    with pytest.raises(TypeError, match="list of SubStage"):
        Bad(compute("a", torch.tanh))(x)
    with pytest.raises(ValueError, match="no sub-stage"):
        Bad([])(x)
    with pytest.raises(ValueError, match="used twice"):
        Bad([compute("a", torch.tanh), compute("a", torch.tanh)])(x)
    with pytest.raises(TypeError, match="must return a CommHandle"):
        Bad([comm("c", lambda t: t, None)])(x)
    with pytest.raises(TypeError, match="tensor or a tuple"):
        Bad([compute("a", lambda t: 3)])(x)
    with pytest.raises(TypeError, match=r"inputs\[1\]"):
        run_substages(Bad([compute("a", torch.tanh)]), [x, "y"])
    with pytest.raises(ValueError, match="kind must be"):
        SubStage("a", "copy", torch.tanh)
    with pytest.raises(ValueError, match="without ':'"):
        compute("a:b", torch.tanh)
    with pytest.raises(ValueError, match="only for 'comm'"):
        SubStage("a", "compute", torch.tanh, backward=torch.tanh)
    with pytest.raises(ValueError, match="no weight gradient"):
        SubStage("a", "comm", torch.tanh, split_weight_grad=True)
    with pytest.raises(TypeError, match="StreamPair"):
        Toy().configure_overlap(streams="cuda")
    # a non-differentiable comm whose outputs get gradients
    m = Bad([compute("a", torch.tanh), comm("c", CommHandle.ready, None)])
    y = m(leaf(x))
    assert not y.requires_grad  # no backward declared: nothing flows through
    # a comm backward returning the wrong number of gradients
    m = Bad([comm("c", lambda t: CommHandle.ready(t * 1), lambda g: CommHandle.ready((g, g)))])
    with pytest.raises(ValueError, match="one per input"):
        m(leaf(x)).sum().backward()
    with pytest.raises(ValueError, match="one gradient"):
        o = Toy()(leaf(x))
        overlapped_forward_backward(Toy(), [x], None, [], Toy(), None, [o], [])


def test_comm_handles():
    t = torch.ones(2)
    h = CommHandle.ready(t)
    assert h.wait() == (t,) and h.wait() == (t,)
    fired = []
    assert h.add_done_callback(lambda: fired.append(1)) and fired == [1]
    fut = torch.futures.Future()
    h2 = CommHandle.from_future(fut)
    h2.add_done_callback(lambda: fired.append(2))
    fut.set_result((t, t))
    assert h2.wait() == (t, t) and fired == [1, 2]
    assert not CommHandle(lambda: t).add_done_callback(lambda: None)
    with pytest.raises(TypeError, match="Future"):
        CommHandle.from_future(3)
    with pytest.raises(TypeError, match="async_op=True"):
        CommHandle.from_work(3, t)
    with pytest.raises(TypeError, match="callable"):
        run_async(3)
    assert run_async(lambda: t + 1).wait()[0].tolist() == [2.0, 2.0]
    ev = StreamPair.for_device("cpu").record()
    assert CommHandle.from_event(ev, t).wait() == (t,)


# -- two ranks, real gloo all-to-all --------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _a2a(x):
    out = torch.empty_like(x)
    return CommHandle.from_work(dist.all_to_all_single(out, x.contiguous(), async_op=True), out)


class DistToy(Toy):
    def substages(self):
        return [compute("attn", lambda x: attn_fn(self, x), split_weight_grad=True),
                comm("dispatch", _a2a, _a2a),
                compute("mlp", lambda h: mlp_fn(self, h), split_weight_grad=True),
                comm("combine", _a2a, _a2a)]


def _dist_worker(rank, world, port, q):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=30))
        torch.manual_seed(0)
        a, b = DistToy(), DistToy()
        c, d = DistToy(), DistToy()
        x0, x1 = (torch.randn(8, H) + rank for _ in range(2))
        g1 = torch.randn(8, H)
        # overlapped
        in1 = leaf(x1)
        o1 = b(in1)
        outs, _ = overlapped_forward_backward(a, (leaf(x0),), None, [], b, None, [o1], [g1])
        # plain: forward then backward, same collectives in the same order on every rank
        r_in1 = leaf(x1)
        r_o1 = d(r_in1)
        r_out0 = c(leaf(x0))
        r_o1.backward(g1)
        ok = (torch.equal(outs[0], r_out0) and torch.equal(in1.grad, r_in1.grad)
              and all(torch.equal(p.grad, r.grad) for p, r in zip(b.parameters(), d.parameters())))
        q.put((rank, "ok" if ok else "mismatch"))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ranks_gloo_all_to_all():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + 90
        while len(results) < 2:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"ranks {sorted({0, 1} - set(results))} did not finish in 90 s")
            try:
                rank, status = q.get(timeout=min(left, 1.0))
                results[rank] = status
            except Exception:  # queue.Empty
                dead = any(not p.is_alive() and p.exitcode not in (0, None) for p in procs)
                if dead and q.empty():
                    pytest.fail(f"a rank died: exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert results == {0: "ok", 1: "ok"}


# -- CUDA: comm kernels on the comm stream, same numbers ----------------------------------
class CudaToy(Toy):
    """The 'all-to-alls' are kernels queued on the current (comm) stream, followed by an
    event: stream-ordered handles, no host blocking."""

    def substages(self):
        def a2a(x):
            out = flip(x)
            return CommHandle.from_event(StreamPair.for_device(x.device).record(), out)

        return [compute("attn", lambda x: attn_fn(self, x), split_weight_grad=True),
                comm("dispatch", a2a, a2a),
                compute("mlp", lambda h: mlp_fn(self, h), split_weight_grad=True),
                comm("combine", a2a, a2a)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dedicated_compute", [False, True])
def test_cuda_overlapped_equals_plain(dedicated_compute):
    dev = torch.device("cuda")
    toy0, toy1 = CudaToy().to(dev), CudaToy().to(dev)
    ref0, ref1 = ToyRef(toy0).to(dev), ToyRef(toy1).to(dev)
    pair = StreamPair.create(dev, compute_priority="low" if dedicated_compute else None)
    toy0.configure_overlap(streams=pair, timeline=Timeline(device=dev))
    (x0, _), (x1, _) = data(1), data(2)
    x0, x1, g1 = x0.to(dev), x1.to(dev), torch.randn(8, H, device=dev)
    r_in1 = leaf(x1)
    r_out1 = ref1(r_in1)
    r_out0 = ref0(leaf(x0))
    r_out1.backward(g1)
    in1 = leaf(x1)
    out1 = toy1(in1)
    outs0, _ = CudaToy.overlapped_forward_backward(toy0, (leaf(x0),), None, [], toy1, None,
                                                   [out1], [g1])
    torch.cuda.synchronize()
    assert torch.equal(outs0[0], r_out0)
    assert torch.equal(in1.grad, r_in1.grad)
    assert_bitwise(grads(toy1), grads(ref1))
    tl = toy0._overlap_config["timeline"]
    labels = [iv.action for iv in tl.intervals(lanes=[SUBSTAGE_COMPUTE_LANE, SUBSTAGE_COMM_LANE])]
    assert sorted(labels) == sorted(DEEPSEEK)


# -- with the DualPipe runtime: the contract as the scheduler calls it --------------------
class SubStageBlock(SubStageModule):
    """tests.models.Stage as sub-stages: l1+tanh -> a threaded 'all-to-all' -> l2+residual."""

    calls = 0

    recomputes = 0

    def __init__(self, stage, tuple_io=False, recompute=False):
        super().__init__()
        from tests.models import Stage
        ref = Stage(stage)
        self.l1, self.l2 = ref.l1, ref.l2
        self.recompute = recompute

    def substages(self):
        def move(*ts):
            return run_async(lambda: tuple(t.clone() for t in ts))

        def a(x):
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
                type(self).recomputes += 1  # running inside a backward: the recompute
            return torch.tanh(self.l1(x)), x

        return [compute("a", a, recompute=self.recompute),
                comm("c", move, move),
                compute("b", lambda h, x: self.l2(h) + x, recompute=self.recompute)]

    @classmethod
    def overlapped_forward_backward(cls, *args):
        cls.calls += 1
        return super().overlapped_forward_backward(*args)


def _runtime_worker(rank, world, name, n, recompute=False):
    from dualpipe import DualPipe, DualPipeV
    from dualpipe.schedules import get_schedule
    from tests.models import criterion, make_batch
    from tests.workers import rank_io
    s = get_schedule(name, world, n)
    mods = [SubStageBlock(stage, recompute=recompute) for (_st, stage) in s.placement[rank]]
    pipe = (DualPipe if name == "dualpipe" else DualPipeV)(mods)
    xs, ys = make_batch(0, n, False)
    inputs, labels, loss_slice = rank_io(s, rank, xs, ys)
    with warnings.catch_warnings():  # "rank holds no last stage: criterion ignored"
        warnings.simplefilter("ignore", UserWarning)
        loss, _ = pipe.step(*inputs, num_chunks=n, criterion=criterion, labels=labels)
    grads = {stage: {k: p.grad.clone() for k, p in m.named_parameters()}
             for m, (_s, stage) in zip(mods, s.placement[rank])}
    return dict(loss=loss, loss_slice=loss_slice, grads=grads, calls=SubStageBlock.calls,
                recomputes=SubStageBlock.recomputes)


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("name,world,n", [("dualpipev", 2, 6)])
def test_dualpipe_runtime_uses_generated_overlap(name, world, n, recompute):
    """The runtime's F&B pairs through overlap.fb, also with every compute sub-stage
    recomputed (activation checkpointing inside the overlapped pair): numbers equal one
    process's."""
    run_ranks = pytest.importorskip("tests.mp").run_ranks
    from tests.models import cosine_distance, reference
    res = run_ranks(_runtime_worker, world, name, n, recompute, timeout=120)
    assert all(r["calls"] > 0 for r in res)  # the F&B pairs went through overlap.fb
    # one recompute of "a" per micro-batch per chunk when recomputing, none otherwise
    assert all(r["recomputes"] == (2 * n if recompute else 0) for r in res), \
        [r["recomputes"] for r in res]
    stages = 2 * world if name == "dualpipev" else world
    ref_losses, _, ref_grads = reference(stages, n, 1, False)
    for r in res:
        if r["loss_slice"] is not None:
            a, b = r["loss_slice"]
            assert torch.equal(r["loss"], ref_losses[0][a:b])
    total = {}
    for r in res:
        for st, g in r["grads"].items():
            for k, t in g.items():
                acc = total.setdefault(st, {})
                acc[k] = acc[k] + t if k in acc else t.clone()
    for st, ref in ref_grads.items():
        for k, t in ref.items():
            assert cosine_distance(total[st][k], t) < 1e-13
