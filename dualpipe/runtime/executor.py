"""The per-step executor: runs one rank's :class:`~dualpipe.runtime.plan.Plan` on its
stage modules.  One :class:`StepExecutor` per step holds the step's buffers, handles and
counters; :meth:`StepExecutor.run` is the loop.

Per plan step: post receives up to ``post_upto`` (:meth:`~StepExecutor.post_until`),
wait for the ones this step consumes (:meth:`~StepExecutor.wait_recv`) and free the sends
they prove delivered, run F / B / I / W / F&B, post the step's sends right after the
compute that produced them (:meth:`~StepExecutor.send`).  After the last step: the
end-of-step agreement (``confirm_steps``), then every send is waited for.

What crosses a boundary is described once per (num_chunks, mode, chunk, input
signature): the first activation is preceded by its shapes/dtypes
(:func:`overlap.p2p.pack_meta`), the first gradient by which input gradients are
``None`` (:func:`dualpipe.runtime.boundary.pack_mask`); the pipeline caches both.

Cost per action matters here (``bench.overhead``): the loop binds what it uses to
locals, and no helper is called per action that the closures this replaced did not
call.
"""

from __future__ import annotations

import time
import warnings

import torch

from overlap.p2p import META_LEN, TensorMeta, pack_meta, unpack_meta
from overlap.transport import TransferHandle

from ..schedules import B, F, FB, I, Schedule
from ..utils import gather, run_backward
from ..weight_grad import WeightGradStore
from . import boundary
from .boundary import TAG_B, TAG_F, TAG_MASK, TAG_META, mask_text, pack_mask, unpack_mask
from .errors import PipelineError
from .failure import AGREEMENT
from .plan import Plan
from .timing import COMPUTE_LANE, WAIT_LANE, DeviceStep, StepStats

__all__ = ["StepExecutor", "as_tuple"]


def as_tuple(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    raise TypeError(f"a pipeline stage must return a Tensor or a tuple/list of Tensors, "
                    f"got {type(x).__name__}")


class StepExecutor:
    """One step of one rank (see the module docstring)."""

    __slots__ = (
        "pipe", "rank", "plan", "modules", "device", "timeout", "p2p", "to_group",
        "criterion", "label_mbs", "return_outputs", "training", "keys",
        "is_first", "is_last", "next_local", "prev_local",
        "inputs", "outputs", "out_grads", "losses", "kept_outputs", "wgrads",
        "recv_handles", "meta_handles", "send_handles", "pending", "posted",
        "meta_sent", "meta_recv", "mask_sent", "mask_recv", "meta_checked", "meta_abort",
        "live", "peak", "wait_total", "times", "record", "t_start",
        "device_clock", "stream", "take", "spans",
    )

    def __init__(self, pipe, s: Schedule, plan: Plan, sig, batches, label_mbs, criterion,
                 return_outputs: bool, forward_only: bool, t_start: float):
        rank = self.rank = pipe.rank
        self.pipe = pipe
        self.plan = plan
        self.modules = pipe.module
        self.device = pipe.device
        self.timeout = pipe.timeout
        self.p2p = pipe._p2p
        self.to_group = pipe.to_group
        self.criterion = criterion
        self.label_mbs = label_mbs
        self.return_outputs = return_outputs
        self.training = not forward_only
        placement = s.placement[rank]
        nchunk = len(placement)
        # the boundary caches' key per chunk (see PipelineRuntime._remember_signature)
        self.keys = [(s.num_chunks, forward_only, c, sig) for c in range(nchunk)]
        # local hand-offs (two chunks of this rank adjacent in a stream)
        links = s.neighbours[rank]
        self.prev_local = [p[1] if p is not None and p[0] == rank else None for p, _ in links]
        self.next_local = [n[1] if n is not None and n[0] == rank else None for _, n in links]
        self.is_first = [p is None for p, _ in links]
        self.is_last = [n is None for _, n in links]
        nmb = [s.streams[st].num_microbatches for st, _ in placement]
        self.inputs = [[None] * nmb[c] for c in range(nchunk)]
        self.outputs = [[None] * nmb[c] for c in range(nchunk)]
        self.out_grads = [[None] * nmb[c] for c in range(nchunk)]
        self.losses = [[None] * nmb[c] for c in range(nchunk)]
        self.kept_outputs = [[None] * nmb[c] for c in range(nchunk)]
        self.wgrads: dict[tuple[int, int], list] = {}
        for c, mbs in batches.items():
            self.inputs[c] = list(mbs)
        self.recv_handles: list[TransferHandle | None] = [None] * len(plan.recvs)
        self.meta_handles: dict[tuple, TransferHandle] = {}  # (F|B, chunk) -> shapes or layout
        self.send_handles: list[TransferHandle] = []         # shape messages; reaped at the end
        self.pending: dict[int, TransferHandle] = {}         # send id -> data send not yet reaped
        self.posted = 0
        self.meta_sent = pipe._meta_sent
        self.meta_recv = pipe._meta_recv
        self.mask_sent = pipe._mask_sent
        self.mask_recv = pipe._mask_recv
        self.meta_checked = pipe._meta_checked
        # NCCL: a failure elsewhere need not end this host-side wait (an aborted peer's
        # transfers just never arrive), so poll the failure record; gloo's receives end
        # when the failing rank drops its connections (and report completion only once
        # waited for, so they cannot be polled)
        self.meta_abort = pipe._abort if pipe.transport == "nccl" else None
        self.live = self.peak = 0
        self.wait_total = 0.0
        self.times: list[tuple] = []
        self.record = pipe.record_timeline
        self.t_start = t_start
        # one clock (see PipelineRuntime): the host's on CPU; on CUDA every interval is
        # a pair of events on the current stream, read when the stats are accessed
        self.device_clock = pipe._ev_start is not None
        if self.device_clock:  # the stream the stages' kernels go to (the current one)
            self.stream = torch.cuda.current_stream(self.device)
            self.take = iter(pipe._take_events(2 * (len(plan.steps) + len(plan.recvs))
                                               + 1)).__next__
            self.spans: list[tuple] = []

    # ------------------------------------------------------------------ receives
    def post_until(self, limit: int) -> None:
        """Post receives up to index ``limit`` (stops early at a receive whose shapes
        or gradient layout must arrive first: that message is posted instead)."""
        posted = self.posted
        recvs, keys, p2p, to_group = self.plan.recvs, self.keys, self.p2p, self.to_group
        try:
            while posted < limit:
                kind, c, m, peer = recvs[posted]
                if kind == F:
                    metas = self.meta_recv.get(keys[c])
                    if metas is None:
                        if (F, c) not in self.meta_handles:
                            buf = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
                            self.meta_handles[(F, c)] = p2p.irecv(
                                [buf], to_group[peer], f"shapes for F{c}.{m}", TAG_META)
                        return
                    bufs = [torch.empty(mt.shape, dtype=mt.dtype, device=self.device)
                            for mt in metas]
                    what = f"activation for F{c}.{m}"
                    tag = TAG_F
                else:
                    metas = self.meta_sent.get(keys[c])
                    if metas is None:  # first step: shapes known once F{c} has run
                        return
                    if keys[c] not in self.mask_recv:  # which gradients are None: once
                        if (B, c) not in self.meta_handles:
                            buf = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
                            self.meta_handles[(B, c)] = p2p.irecv(
                                [buf], to_group[peer], f"gradient layout for B{c}.{m}",
                                TAG_MASK)
                        return
                    bufs = [torch.empty(mt.shape, dtype=mt.dtype, device=self.device)
                            for mt in metas if mt.requires_grad]
                    what = f"gradient for B{c}.{m}"
                    tag = TAG_B
                self.recv_handles[posted] = p2p.irecv(bufs, to_group[peer], what, tag)
                posted += 1
        finally:
            self.posted = posted

    def wait_recv(self, idx: int, text: str) -> list[torch.Tensor]:
        """Wait for receive ``idx`` (consumed by step ``text``), posting it first when
        posting had stopped at a shapes / layout message before it."""
        recv_handles, recvs = self.recv_handles, self.plan.recvs
        while recv_handles[idx] is None:  # posting stopped at a shape message
            posted = self.posted
            kind, c, m, peer = recvs[posted]
            h = self.meta_handles.pop((kind, c), None)
            if h is not None:  # the host needs the shapes to allocate the buffers
                buf = h.wait(self.timeout, self.meta_abort, host=True)[0]
                if kind == F:
                    self.meta_recv[self.keys[c]] = unpack_meta(buf)
                else:
                    self.mask_recv[self.keys[c]] = unpack_mask(buf)
            self.post_until(idx + 1)
            if self.posted == posted and h is None and (kind, c) not in self.meta_handles:
                rank = self.rank
                raise PipelineError(f"pipeline rank {rank}, action {text}: internal error: "
                                    f"cannot post receive {recvs[posted]}", rank, text)
        h = recv_handles[idx]
        recv_handles[idx] = None
        # no is_completed() probe first: gloo reports a receive complete only once
        # it has been waited for, so the probe would be one more call per receive
        if self.device_clock:  # NCCL: the wait is the stream's stall between two events
            take, stream = self.take, self.stream
            e0 = take()
            e0.record(stream)
            tensors = h.wait(self.timeout)
            e1 = take()
            e1.record(stream)
            self.spans.append((e0, e1, text, WAIT_LANE))
            return tensors
        clock = time.perf_counter
        t0 = clock()
        tensors = h.wait(self.timeout)
        t1 = clock()
        self.wait_total += t1 - t0
        if self.record:
            t_start = self.t_start
            self.times.append((t0 - t_start, t1 - t_start, text, WAIT_LANE))
        return tensors

    # ------------------------------------------------------------------ sends
    def send(self, kind, c, m, peer, sid, tensors, text, like=()):
        """Post the send of ``tensors`` (kind F: chunk ``c``'s outputs; B: its input
        gradients, ``like`` the inputs), preceded on first use by their description."""
        rank, p2p, key = self.rank, self.p2p, self.keys[c]
        if kind == F:
            metas = [TensorMeta.of(t) for t in tensors]
            known = self.meta_sent.get(key)
            if known is None:
                boundary.check_declared(metas)
                self.meta_sent[key] = metas
                self.meta_checked[key] = boundary._p2p_version
                self.send_handles.append(p2p.isend([pack_meta(metas, self.device)],
                                                   self.to_group[peer], f"shapes of {text}",
                                                   TAG_META))
            elif known != metas:
                raise PipelineError(
                    f"pipeline rank {rank}, action {text}: stage output changed from "
                    f"{[str(x) for x in known]} to {[str(x) for x in metas]} for the same "
                    "inputs; every micro-batch must produce the same shapes/dtypes",
                    rank, text)
            elif self.meta_checked[key] != boundary._p2p_version:  # declared anew since
                boundary.check_declared(metas)
                self.meta_checked[key] = boundary._p2p_version
            h = p2p.isend(tensors, self.to_group[peer], f"send {text}", TAG_F)
        else:
            # tensors: this stage's input gradients, None where no gradient reached
            # an input (a single process leaves the earlier stages' .grad None then);
            # which ones are None is sent once per signature, zeros stand in for them
            mask = tuple(g is not None for g in tensors)
            known = self.mask_sent.get(key)
            if known is None:
                self.mask_sent[key] = mask
                self.send_handles.append(p2p.isend([pack_mask(mask, self.device)],
                                                   self.to_group[peer],
                                                   f"gradient layout of {text}", TAG_MASK))
            elif known != mask:
                raise PipelineError(
                    f"pipeline rank {rank}, action {text}: which input gradients are None "
                    f"changed from {mask_text(known)} to {mask_text(mask)} for the same "
                    "inputs; every micro-batch of a step must use its stage inputs the "
                    "same way (a gradient that is None for one must be None for all)",
                    rank, text)
            if not all(mask):
                tensors = [g if g is not None else torch.zeros_like(t)
                           for g, t in zip(tensors, like)]
            h = p2p.isend(tensors, self.to_group[peer], f"send {text}", TAG_B)
        self.pending[sid] = h

    def release_sent(self, c, m, out):
        """Release the memory of sent outputs that nothing can read any more.

        The send holds its own reference to the storage until it completes, and
        autograd needs only an output's grad_fn, not its data.  An output's data goes
        when autograd produced it (it has a grad_fn: no input, parameter, buffer or
        tensor without gradient), it is not a view (its storage is its base's) and
        nothing else holds the tensor (use count 1; autograd holds a tensor that a
        later op saved for its backward, while an op saving its own output keeps a
        separate alias).  Everything else is sent and kept until its backward."""
        for t in out:
            if t.grad_fn is None:
                continue
            if t._base is not None:
                self.view_kept(c, m, t)
            elif t._use_count() == 1 and not any(t is x for x in self.inputs[c][m]):
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def view_kept(self, c, m, t):
        pipe = self.pipe
        if pipe._warned_view:
            return
        base = t._base
        if any(base is x or base is x._base for x in self.inputs[c][m] if x is not None):
            return  # a view of an input: kept anyway for its own backward
        pipe._warned_view = True
        warnings.warn(
            f"pipeline rank {self.rank}: a stage output sent to the next stage is a view of "
            f"another tensor ({t.dtype}{list(t.shape)} of {base.dtype}{list(base.shape)}); "
            "it is sent correctly, but its memory (its base's) stays allocated until the "
            "micro-batch's backward: return a fresh tensor (e.g. .clone()) to let the "
            "pipeline release it after sending", stacklevel=2)

    # ------------------------------------------------------------------ compute
    def forward(self, c, m, text):
        ins = self.inputs[c][m]
        if ins is None:
            raise PipelineError(f"pipeline rank {self.rank}, action {text}: no input",
                                self.rank, text)
        out = as_tuple(self.modules[c](*ins))
        loss = None
        criterion = self.criterion
        if self.is_last[c] and criterion is not None:
            loss = criterion(*out, *self.label_mbs[c][m])
            self.losses[c][m] = loss
        return out, loss

    def after_forward(self, c, m, out, text, sends):
        """Keep (training) or drop (inference) the forward's outputs, hand them to the
        next stage: a local chunk, or a send."""
        training = self.training
        if training:
            self.live += 1
            if self.live > self.peak:
                self.peak = self.live
        if self.is_last[c]:
            if self.return_outputs:
                self.kept_outputs[c][m] = tuple(t.detach() for t in out)
            if training:
                self.outputs[c][m] = out
            else:
                self.inputs[c][m] = None
            return
        nl = self.next_local[c]
        if nl is not None:
            self.inputs[nl][m] = tuple(t.detach().requires_grad_(t.requires_grad and training)
                                       for t in out)
        if training:
            self.outputs[c][m] = out
        else:
            self.inputs[c][m] = None
        for (k, sc, sm, peer, sid) in sends:
            if k == F and sc == c:
                self.send(F, c, m, peer, sid, out, text)
                if training:
                    self.release_sent(c, m, out)

    def backward_args(self, c, m, text):
        """(loss, outputs, output grads) to backpropagate micro-batch m of chunk c."""
        if self.is_last[c]:
            loss = self.losses[c][m]
            if loss is None:
                rank = self.rank
                raise PipelineError(f"pipeline rank {rank}, action {text}: no loss to "
                                    "backpropagate (criterion returned None?)", rank, text)
            return loss, (), ()
        outs = self.outputs[c][m]
        grads = self.out_grads[c][m]
        self.out_grads[c][m] = None
        # outputs that need a gradient, paired with theirs; None: none reached it
        pairs = [(o, g) for o, g in zip((o for o in outs if o.requires_grad), grads)
                 if g is not None]
        return None, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def after_backward(self, c, m, text, sends):
        """Drop the micro-batch's activations, hand its input gradients on."""
        self.live -= 1
        self.outputs[c][m] = None
        ins = self.inputs[c][m]
        self.inputs[c][m] = None
        if self.is_first[c]:
            return
        need = [t for t in ins if t.requires_grad]
        grads = [t.grad for t in need]  # None where no gradient reached an input
        pl = self.prev_local[c]
        if pl is not None:
            self.out_grads[pl][m] = grads
        for (k, sc, sm, peer, sid) in sends:
            if k == B and sc == c:
                self.send(B, c, m, peer, sid, grads, text, need)

    def run_b(self, c, m, defer, text):
        """A backward (B), or its input-gradient part (I, ``defer``: the weight
        gradients wait in WeightGradStore for the matching W)."""
        loss, outs, grads = self.backward_args(c, m, text)
        defer = defer and not self.pipe._whole_backward[c]
        WeightGradStore.enabled = defer
        try:
            if loss is not None:
                loss.backward()
                self.losses[c][m] = loss.detach()
            elif outs:
                run_backward(outs, grads)
        finally:
            WeightGradStore.enabled = False
        if defer:
            self.wgrads[(c, m)] = WeightGradStore.take()

    def overlapped_fb(self, c, m, c2, m2, text):
        """F&B through the stage class's ``overlapped_forward_backward``."""
        modules, label_mbs = self.modules, self.label_mbs
        ins0 = self.inputs[c][m]
        crit0 = self.criterion if self.is_last[c] else None
        lab0 = label_mbs[c][m] if crit0 is not None else []
        loss1, outs1, grads1 = self.backward_args(c2, m2, text)
        out0, loss0 = type(modules[0]).overlapped_forward_backward(
            modules[c], ins0, crit0, lab0, modules[c2], loss1, list(outs1), list(grads1))
        if loss1 is not None:
            self.losses[c2][m2] = loss1.detach()
        out0 = as_tuple(out0)
        if crit0 is not None:
            self.losses[c][m] = loss0
        return out0

    # ------------------------------------------------------------------ the loop
    def run(self):
        """Run the step; returns ``(loss, outputs)`` (see PipelineRuntime.step)."""
        pipe = self.pipe
        plan = self.plan
        recvs, release, pending = plan.recvs, plan.release, self.pending
        inputs, out_grads = self.inputs, self.out_grads
        meta_recv, mask_recv, keys = self.meta_recv, self.mask_recv, self.keys
        post_until, wait_recv = self.post_until, self.wait_recv
        forward, after_forward = self.forward, self.after_forward
        run_b, after_backward = self.run_b, self.after_backward
        overlapped = pipe.overlapped_forward_backward
        training, timeout, record = self.training, self.timeout, self.record
        device_clock, t_start = self.device_clock, self.t_start
        take, stream = (self.take, self.stream) if device_clock else (None, None)
        clock = time.perf_counter
        busy = 0.0
        text = "start of step"
        agreed = False
        poll = self.p2p.poll if self.p2p.needs_poll else None  # no driving needed: skip it
        try:
            for (a, need, sends, post_upto, text) in plan.steps:
                if poll is not None:
                    poll()  # keep large messages streaming between compute actions
                if post_upto > self.posted:
                    post_until(post_upto)
                for idx in need:
                    rk, rc, rm, _ = recvs[idx]
                    tensors = wait_recv(idx, text)
                    for sid in release[idx]:  # sends now known to have arrived: free them
                        h = pending.pop(sid, None)
                        if h is not None:
                            h.wait(timeout)
                    if rk == F:
                        metas = meta_recv[keys[rc]]
                        for t, mt in zip(tensors, metas):
                            if mt.requires_grad and training:
                                t.requires_grad_(True)
                        inputs[rc][rm] = tuple(tensors)
                    else:
                        mask = mask_recv[keys[rc]]
                        out_grads[rc][rm] = tensors if mask is True else \
                            [g if keep else None for g, keep in zip(tensors, mask)]
                if device_clock:
                    e0 = take()
                    e0.record(stream)
                else:
                    t0 = clock()
                kind, c, m = a.kind, a.chunk, a.mb
                if kind == F:
                    out, _ = forward(c, m, text)
                    after_forward(c, m, out, text, sends)
                elif kind == FB and overlapped:
                    after_forward(c, m, self.overlapped_fb(c, m, a.chunk2, a.mb2, text),
                                  text, sends)
                    after_backward(a.chunk2, a.mb2, text, sends)
                elif kind == FB:
                    out, _ = forward(c, m, text)
                    after_forward(c, m, out, text, sends)
                    run_b(a.chunk2, a.mb2, False, text)
                    after_backward(a.chunk2, a.mb2, text, sends)
                elif kind == B or kind == I:
                    run_b(c, m, kind == I, text)
                    after_backward(c, m, text, sends)
                else:  # W
                    for fn in self.wgrads.pop((c, m), ()):
                        fn()
                if device_clock:
                    e1 = take()
                    e1.record(stream)
                    self.spans.append((e0, e1, text, COMPUTE_LANE))
                else:
                    t1 = clock()
                    busy += t1 - t0
                    if record:
                        self.times.append((t0 - t_start, t1 - t_start, text, COMPUTE_LANE))
            if pipe.confirm_steps:
                # every rank agrees the step succeeded before any returns, so a rank
                # failing in its last actions cannot leave the others stepping their
                # optimizers on a step it did not finish; after it, every receive has
                # been posted, so draining the sends below cannot block
                text = AGREEMENT
                # (on NCCL the collective queues behind everything this step's kernels
                # waited for, so this host-side deadline also bounds every transfer)
                self.p2p.all_gather(torch.ones(1, dtype=torch.int64, device=self.device),
                                    pipe.num_ranks, "end-of-step agreement").wait(
                    timeout, pipe._abort, host=True)
                agreed = True
                pipe._agreements += 1
                if pipe._board is not None:
                    pipe._board.agreed = pipe._agreements  # the heartbeat says it
            text = "end of step (sends)"
            for h in self.send_handles:
                h.wait(timeout)
            for h in pending.values():
                h.wait(timeout)
            pending.clear()
        except Exception as e:  # noqa: BLE001 - every failure stops all ranks
            # drop every reference to the transfers and the backend held by this frame,
            # this object and the traceback, so the teardown in _failed really closes
            # the connections (peers then stop at once instead of at their timeout)
            self.p2p = poll = None  # noqa: F841
            self.recv_handles.clear()
            self.meta_handles.clear()
            self.send_handles.clear()
            pending.clear()
            h = tensors = None  # noqa: F841
            pipe._step_failed(e, text, agreed)  # raises unless the step is complete
        return self.results(busy)

    def results(self, busy: float):
        """The step's ``(loss, outputs)``; its figures go to the pipeline."""
        pipe = self.pipe
        loss_out, outs_out = None, None
        for c, last in enumerate(self.is_last):
            if last:
                if self.criterion is not None:
                    loss_out = torch.stack([x.detach() for x in self.losses[c]])
                if self.return_outputs:
                    o = gather(self.kept_outputs[c], pipe.batch_dim)
                    outs_out = o[0] if len(o) == 1 else tuple(o)
        pipe.steps_done += 1
        ncompute = len(self.plan.steps)
        if self.device_clock:
            end = self.take()
            end.record(self.stream)
            pipe._device_step_done(DeviceStep(pipe._ev_start, end, self.spans, self.record,
                                              self.peak, ncompute))
        else:
            pipe._host_step_done(
                StepStats(wall=time.perf_counter() - self.t_start, busy=busy,
                          wait=self.wait_total, peak_activations=self.peak,
                          num_compute=ncompute),
                self.times if self.record else None)
        return loss_out, outs_out
