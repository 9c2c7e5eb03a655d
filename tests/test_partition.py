"""SMPartition: rounding, the CPU twin, errors, NCCL CTA caps; GPU checks when CUDA exists.

The GPU tests prove a partition with the SM-id probe: kernels launched on each stream
record the SMs they ran on; the sets must fit the reported counts and, for the
hardware-enforced split, be disjoint, up to the 2 extra, shared SMs CUDA allows
green-context work once a module with dynamic parallelism is loaded. SM ids are checked
against ``%nsmid``, not the SM count (ids need not be contiguous). The checks themselves
(``check_probe``) are tested on CPU with hand-made id sets; the GPU tests are skipped
(with the reason) on CPU machines.
"""
import json
import re
import os
import subprocess
import sys

import pytest
import torch

from overlap import _ext
from overlap import partition as P
from overlap.partition import (PartitionClosedError, PartitionConfigError, PartitionUnavailableError,
                               SMGranularity, SMPartition, round_comm_sms)

HOPPER = SMGranularity(8, 8)
AMPERE = SMGranularity(4, 2)
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs CUDA (torch.cuda.is_available() is False)")


# ---- rounding ------------------------------------------------------------------------

@pytest.mark.parametrize("requested,gran,rounding,expected", [
    (20, HOPPER, "up", 24),      # DeepSeek-V3's 20 comm SMs become 24 on Hopper
    (20, HOPPER, "down", 16),
    (24, HOPPER, "exact", 24),
    (1, HOPPER, "up", 8),        # never below the minimum partition
    (5, HOPPER, "down", 8),
    (5, AMPERE, "up", 6),
    (5, AMPERE, "down", 4),
    (3, AMPERE, "down", 4),
    (7, SMGranularity(1, 1), "exact", 7),
])
def test_round_comm_sms(requested, gran, rounding, expected):
    assert round_comm_sms(requested, 132, gran, rounding) == expected


@pytest.mark.parametrize("requested,rounding,match", [
    (20, "exact", "multiple of 8"),
    (4, "exact", "at least 8"),
    (125, "up", "at most 120"),     # 128 would leave 4 < 8 for compute
    (0, "up", "positive int"),
    (True, "up", "positive int"),
    (2.5, "up", "positive int"),
    (8, "nearest", "rounding must be"),
])
def test_round_comm_sms_errors_say_what_to_change(requested, rounding, match):
    with pytest.raises(PartitionConfigError, match=match):
        round_comm_sms(requested, 132, HOPPER, rounding)


def test_documented_granularity_table():
    assert P.documented_granularity(9) == HOPPER
    assert P.documented_granularity(10) == HOPPER
    assert P.documented_granularity(8) == AMPERE
    assert P.documented_granularity(7) == SMGranularity(2, 2)


def test_partition_errors_are_typed():
    assert issubclass(PartitionConfigError, ValueError)
    for cls in (PartitionConfigError, PartitionUnavailableError, PartitionClosedError):
        assert issubclass(cls, P.PartitionError) and issubclass(cls, RuntimeError)


# ---- CPU twin ---------------------------------------------------------------------------

def test_cpu_twin_models_hopper_by_default():
    with SMPartition(comm_sms=20, device="cpu") as part:
        assert (part.backend, part.comm_sms, part.compute_sms, part.total_sms) == ("cpu", 24, 108, 132)
        assert part.requested_comm_sms == 20 and not part.disjoint and part.enforced == "none"
        assert part.comm_stream.query() and part.compute_stream.query()
        part.comm_stream.wait_stream(part.compute_stream)  # no-ops with the CUDA signatures
        part.compute_stream.synchronize()
        with part.comm() as s:
            assert s is part.comm_stream
        with part.compute():
            pass
        info = part.describe()
        json.dumps(info)  # benchmark records need plain data
        assert info["comm_sms"] == 24 and info["min_partition"] == 8 and info["closed"] is False


def test_stream_pair_carries_the_partition_streams():
    part = SMPartition(8, "cpu")
    pair = part.stream_pair()
    assert not pair.is_cuda
    assert pair.comm is part.comm_stream and pair.compute is part.compute_stream
    with pair.on("comm"):
        pass
    pair.synchronize()
    part.close()
    with pytest.raises(PartitionClosedError):
        part.stream_pair()


def test_cpu_twin_custom_model_and_rounding():
    part = SMPartition(5, "cpu", total_sms=108, granularity=AMPERE, rounding="down")
    assert (part.comm_sms, part.compute_sms) == (4, 104)
    part.close()


def test_default_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: the default device is the GPU")
    assert SMPartition(8).backend == "cpu"


def test_close_is_idempotent_and_blocks_use():
    part = SMPartition(8, "cpu")
    part.close()
    part.close()
    assert part.closed and "closed" in repr(part)
    with pytest.raises(PartitionClosedError, match="create a new one"):
        part.comm_stream
    with pytest.raises(PartitionClosedError):
        part.compute()
    with pytest.raises(PartitionClosedError):
        with part:
            pass


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(comm_sms=8, device="cpu", backend="magic"), PartitionConfigError, "backend must be"),
    (dict(comm_sms=8, device="cpu", backend="green_ctx"), PartitionUnavailableError, "needs a CUDA device"),
    (dict(comm_sms=8, device="cpu", rounding="sideways"), PartitionConfigError, "rounding must be"),
    (dict(comm_sms=0, device="cpu"), PartitionConfigError, "positive int"),
    (dict(comm_sms=8, device="meta"), PartitionConfigError, "cuda and cpu"),
    (dict(comm_sms=8, device="cpu", total_sms=1), PartitionConfigError, "total_sms"),
    (dict(comm_sms=130, device="cpu"), PartitionConfigError, "lower comm_sms"),
])
def test_bad_requests_raise_typed_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SMPartition(**kwargs)


def test_cuda_device_without_cuda_is_unavailable():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(PartitionUnavailableError, match="device='cpu'"):
        SMPartition(8, device="cuda:0")
    with pytest.raises(PartitionUnavailableError):
        SMPartition(8, device=0)


def test_nothing_is_probed_at_import():
    """Importing the modules must not initialize CUDA nor load the extension."""
    code = ("import sys, torch\n"
            "import overlap.partition, overlap._ext, overlap._build, overlap.kernels\n"
            "print(torch.cuda.is_initialized(), 'overlap._C' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ---- probe checks (overlap.partition.check_probe) ------------------------------------------

def _check(comm, compute, enforced="both", comm_sms=8, compute_sms=8, limit=144):
    return P.check_probe({"comm": set(comm), "compute": set(compute)}, comm_sms=comm_sms,
                         compute_sms=compute_sms, sm_id_limit=limit, enforced=enforced)


def test_check_probe_accepts_a_disjoint_split_with_non_contiguous_ids():
    # ids need not be contiguous: some above the SM count (132) but below %nsmid
    c = _check({0, 2, 4, 6, 8, 10, 12, 14}, {130, 133, 135, 137, 139, 141, 142, 143})
    assert c.ok and c.problems == () and c.shared == frozenset()
    assert c.describe()["ok"] is True and c.describe()["shared"] == []


def test_check_probe_allows_the_two_shared_dynamic_parallelism_sms():
    comm = set(range(8)) | {100, 101}            # its 8 + the 2 extra ...
    compute = set(range(16, 24)) | {100, 101}    # ... shared with the other side
    c = _check(comm, compute)
    assert c.ok, c.problems
    assert P.GREEN_CTX_EXTRA_SMS == 2


@pytest.mark.parametrize("comm,compute,enforced,match", [
    (range(11), range(16, 24), "both", r"comm: reached 11 SMs, more than its 8 \+ 2"),
    (range(8), range(16, 27), "both", r"compute: reached 11 SMs"),
    (range(8), list(range(16, 21)) + [0, 1, 2], "both", r"share 3 SMs \[0, 1, 2\]"),
    (range(11), range(16, 24), "comm", r"comm: reached 11 SMs"),
    ({0, 144}, range(16, 24), "both", r"SM ids \[144\] outside \[0, %nsmid=144\)"),
    ((), range(16, 24), "both", "comm: the probe reached no SM"),
])
def test_check_probe_reports_what_is_wrong(comm, compute, enforced, match):
    c = _check(comm, compute, enforced)
    assert not c.ok
    assert any(re.search(match, p) for p in c.problems), c.problems
    if "reached 11" in match or "share" in match:
        assert any("dynamic parallelism" in p for p in c.problems)


def test_check_probe_of_unconfined_sides_checks_only_the_ids():
    # priority backend: both sides may reach every SM
    assert _check(range(132), range(132), enforced="none").ok
    # torch_green_ctx: only the comm side is confined
    assert _check(range(8), range(132), enforced="comm").ok


# ---- NCCL CTA caps --------------------------------------------------------------------

def test_nccl_cta_env():
    assert P.nccl_cta_env(24) == {"NCCL_MAX_CTAS": "24"}
    assert P.nccl_cta_env(24, 4) == {"NCCL_MAX_CTAS": "24", "NCCL_MIN_CTAS": "4"}
    for bad in (dict(max_ctas=0), dict(max_ctas=65), dict(max_ctas=8, min_ctas=9), dict(min_ctas=True)):
        with pytest.raises(PartitionConfigError):
            P.nccl_cta_env(**bad)


def test_apply_nccl_cta_env_respects_the_launcher(monkeypatch):
    monkeypatch.setenv("NCCL_MAX_CTAS", "32")
    monkeypatch.delenv("NCCL_MIN_CTAS", raising=False)
    assert P.apply_nccl_cta_env(16, 2) == {"NCCL_MIN_CTAS": "2"}
    assert os.environ["NCCL_MAX_CTAS"] == "32"
    assert P.apply_nccl_cta_env(16, overwrite=True) == {"NCCL_MAX_CTAS": "16"}
    assert os.environ["NCCL_MAX_CTAS"] == "16"


class _FakeConfig:
    min_ctas = max_ctas = None


class _FakeNCCL:
    class Options:
        def __init__(self):
            self.is_high_priority_stream = False
            self.config = _FakeConfig()


def test_nccl_process_group_options(monkeypatch):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setattr(dist, "ProcessGroupNCCL", _FakeNCCL, raising=False)
    opts = P.nccl_process_group_options(max_ctas=24, min_ctas=4)
    assert (opts.config.max_ctas, opts.config.min_ctas, opts.is_high_priority_stream) == (24, 4, True)
    opts = SMPartition(20, "cpu").nccl_options(high_priority_stream=False)
    assert opts.config.max_ctas == 24 and opts.config.min_ctas is None
    assert opts.is_high_priority_stream is False
    monkeypatch.setattr(dist, "ProcessGroupNCCL", None, raising=False)
    with pytest.raises(PartitionUnavailableError, match="apply_nccl_cta_env"):
        P.nccl_process_group_options(max_ctas=8)


def test_nccl_options_cap_at_64():
    part = SMPartition(100, "cpu", total_sms=200)
    assert part.comm_sms == 104
    import torch.distributed as dist
    if dist.is_available() and getattr(dist, "ProcessGroupNCCL", None) is not None:
        assert part.nccl_options().config.max_ctas == 64


# ---- GPU (skipped without CUDA) ----------------------------------------------------------

def _work(n=1 << 22):
    x = torch.ones(n, device="cuda")
    for _ in range(4):
        x = x * 1.0001 + 1
    return x


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_auto_partition_streams_run_work():
    with SMPartition(comm_sms=16) as part:
        assert part.backend in ("green_ctx", "torch_green_ctx", "priority")
        assert part.comm_sms >= 1 and part.compute_sms >= 1
        assert part.comm_sms + part.compute_sms <= part.total_sms
        with part.compute():
            a = _work()
        with part.comm():
            b = _work()
        pair = part.stream_pair()
        with pair.on("comm", join=True):
            c = _work()
        torch.cuda.synchronize()
        assert torch.equal(a, b) and torch.equal(a, c)
        assert part.comm_stream.priority <= part.compute_stream.priority


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_green_ctx_partition_holds_under_the_smid_probe():
    if _ext.extension_kind() != "cuda":
        pytest.skip(f"needs the CUDA build of the extension (have {_ext.extension_kind()})")
    try:
        part = SMPartition(comm_sms=16, backend="green_ctx")
    except PartitionUnavailableError as exc:
        pytest.skip(f"green contexts unavailable here: {exc}")
    with part:
        assert part.disjoint and part.readback
        assert part.comm_sms % part.granularity.alignment == 0
        check = part.verify()
        assert check.ok, check.describe()
        # 4 blocks per SM spread over all of the comm side's SMs (extras allowed)
        assert len(check.comm) >= part.comm_sms, check.describe()


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_torch_green_ctx_confines_the_comm_side():
    if _ext.extension_kind() != "cuda":
        pytest.skip("the SM-id probe needs the CUDA build of the extension")
    cls = getattr(getattr(torch.cuda, "green_contexts", None), "GreenContext", None)
    if cls is None or not hasattr(cls, "Stream"):
        # this torch cannot give a green-context stream (Stream() came in 2.12): the
        # backend must say so, not half-work; that refusal is what is checked here
        with pytest.raises(PartitionUnavailableError, match="green_contexts|Stream"):
            SMPartition(comm_sms=16, backend="torch_green_ctx")
        return
    try:
        part = SMPartition(comm_sms=16, backend="torch_green_ctx")
    except PartitionUnavailableError as exc:
        pytest.skip(f"torch green contexts unavailable: {exc}")
    with part:
        assert part.enforced == "comm" and not part.disjoint
        check = part.verify()
        assert check.ok, check.describe()


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_priority_backend_warns_that_sms_are_shared(caplog):
    with caplog.at_level("WARNING", logger="overlap.partition"):
        part = SMPartition(comm_sms=20, backend="priority")
    with part:
        assert part.comm_sms == 20 and part.enforced == "none"
        assert part.comm_stream.priority < part.compute_stream.priority or \
            torch.cuda.Stream.priority_range()[0] == torch.cuda.Stream.priority_range()[1]
    assert "NOT partitioned" in caplog.text


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_probe_of_a_plain_stream_reaches_every_sm():
    if _ext.extension_kind() != "cuda":
        pytest.skip("needs the CUDA build of the extension")
    total = torch.cuda.get_device_properties(0).multi_processor_count
    limit = _ext.sm_id_limit(0)
    assert limit >= total  # %nsmid bounds the ids; it may exceed the SM count
    ids = _ext.smid_probe(4 * total)
    torch.cuda.synchronize()
    seen = set(ids.cpu().tolist())
    assert -1 not in seen and min(seen) >= 0 and max(seen) < limit
    assert len(seen) == total
