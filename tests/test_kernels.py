"""Triton kernels (overlap.kernels) against torch references.

Every kernel test runs twice, through the ``device`` fixture: ``cpu``, under the Triton
interpreter (the fixture sets TRITON_INTERPRET=1; the kernels read it at launch, see
kernels/_triton_support.py), which is what CI runs; and ``cuda``, compiled for the GPU,
marked ``gpu`` (so ``-m gpu`` collects it) and skipped with the reason without CUDA. The
``cuda`` variant removes TRITON_INTERPRET and fails if any kernel was launched in
interpreter mode, so a GPU run can never silently interpret. Shapes are tiny because the
interpreter is slow; ragged tails are included on purpose.
Tolerances: relative error ||out - ref|| / ||ref|| against a float64 reference, 1e-5 for
float32 and 1e-2 for bfloat16; pure data movement must be exact.
"""
import pathlib
import subprocess
import sys

import pytest
import torch

from overlap import kernels as K
from overlap.kernels import persistent_matmul
from overlap.kernels.moe_permute import moe_dispatch_index, moe_permute, moe_unpermute

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason=f"triton unavailable: {K.TRITON_ERROR}")
ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA (the compiled-for-GPU variant of the Triton tests)")])


@pytest.fixture(params=[pytest.param("cpu", id="interpreter"), CUDA])
def device(request, monkeypatch):
    """``"cpu"`` under TRITON_INTERPRET=1, or ``"cuda"`` with every launch compiled."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        yield "cpu"
        return
    from overlap.kernels._triton_support import LazyKernel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not K.interpreting()
    modes = []
    compiled = LazyKernel.compiled

    def spy(self):
        kernel = compiled(self)
        inner = getattr(kernel, "fn", kernel)  # an Autotuner wraps the jitted function
        modes.append(K.interpreting() or "Interpreted" in type(inner).__name__)
        return kernel

    monkeypatch.setattr(LazyKernel, "compiled", spy)
    yield "cuda"
    assert True not in modes, "a Triton kernel was launched in interpreter mode on CUDA"


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---- persistent matmul -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K_,num_sms", [
    (16, 16, 16, 1),     # one tile
    (33, 17, 40, 3),     # ragged in M, N and K; 3 programs over 6 tiles
    (5, 70, 19, 2),      # M smaller than a tile, N over 4 tiles
    (48, 32, 8, 100),    # budget larger than the tile count: grid = tiles
])
def test_persistent_matmul_matches_float64(dtype, M, N, K_, num_sms, device):
    g = torch.Generator().manual_seed(M * 1000 + N)
    a = torch.randn(M, K_, generator=g).to(dtype).to(device)
    b = torch.randn(K_, N, generator=g).to(dtype).to(device)
    out = persistent_matmul(a, b, num_sms=num_sms)
    assert out.shape == (M, N) and out.dtype == dtype
    ref = a.double() @ b.double()
    assert rel_err(out, ref) < TOL[dtype]


def test_persistent_matmul_strided_inputs_and_out(device):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(20, 24, generator=g).to(device)
    bt = torch.randn(18, 24, generator=g).to(device)
    out = torch.empty(18, 20, device=device).t()  # non-contiguous output
    got = persistent_matmul(a, bt.t(), num_sms=2, out=out)
    assert got is out
    assert rel_err(out, a.double() @ bt.double().t()) < 1e-5


def test_persistent_matmul_default_budget_and_degenerate_shapes(device):
    a = torch.randn(3, 0, device=device)
    assert torch.equal(persistent_matmul(a, torch.randn(0, 4, device=device)), torch.zeros(3, 4, device=device))
    assert persistent_matmul(torch.randn(0, 5, device=device), torch.randn(5, 4, device=device)).shape == (0, 4)
    x = torch.randn(17, 9, device=device)
    assert rel_err(persistent_matmul(x, x.t().contiguous()), x.double() @ x.double().t()) < 1e-5


def test_persistent_matmul_rejects_bad_input(monkeypatch, device):
    a = torch.randn(4, 5, device=device)
    with pytest.raises(ValueError, match=r"a \[M, K\]"):
        persistent_matmul(a, torch.randn(4, 5, device=device))
    with pytest.raises(TypeError, match="one dtype"):
        persistent_matmul(a, torch.randn(5, 3, device=device).double())
    with pytest.raises(TypeError):
        persistent_matmul(a.long(), torch.randn(5, 3, device=device).long())
    with pytest.raises(ValueError, match="num_sms"):
        persistent_matmul(a, torch.randn(5, 3, device=device), num_sms=0)
    with pytest.raises(ValueError, match="out must be"):
        persistent_matmul(a, torch.randn(5, 3, device=device), out=torch.empty(3, 4, device=device))
    if device == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            persistent_matmul(a, torch.randn(5, 3))


def test_interpreter_configs_are_single_and_fixed():
    """Autotuning means nothing under the interpreter: one config, no benchmarking."""
    from overlap.kernels.moe_permute import permute_configs
    from overlap.kernels.persistent_matmul import matmul_configs

    assert len(matmul_configs(True)) == 1 and len(permute_configs(True)) == 1
    assert len(matmul_configs(False)) > 1 and len(permute_configs(False)) > 1
    for cfg in matmul_configs(False):
        assert all(k.isupper() for k in cfg.kwargs)


# ---- MoE permute / unpermute ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("T,H,topk,E,num_sms", [(7, 45, 2, 4, 3), (1, 8, 1, 1, 1), (12, 70, 3, 5, 64)])
def test_moe_permute_is_an_exact_gather(dtype, T, H, topk, E, num_sms, device):
    g = torch.Generator().manual_seed(T * H)
    x = (torch.randn(T, H, generator=g) * 50).to(dtype).to(device)
    topk_ids = torch.randint(0, E, (T, topk), generator=g).to(device)
    src, combine, counts = moe_dispatch_index(topk_ids, E)
    for index in (src, src.to(torch.int32)):
        out = moe_permute(x, index, num_sms=num_sms)
        assert torch.equal(out, x[src])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("T,H,topk,E,num_sms", [(7, 45, 2, 4, 3), (9, 33, 3, 6, 2)])
def test_moe_unpermute_matches_float64(dtype, weighted, T, H, topk, E, num_sms, device):
    g = torch.Generator().manual_seed(T + H)
    topk_ids = torch.randint(0, E, (T, topk), generator=g).to(device)
    src, combine, _ = moe_dispatch_index(topk_ids, E)
    y = torch.randn(src.numel(), H, generator=g).to(dtype).to(device)
    w = torch.rand(T, topk, generator=g).to(device) if weighted else None
    out = moe_unpermute(y, combine, w, num_sms=num_sms)
    assert out.shape == (T, H) and out.dtype == dtype
    ref = y.double()[combine]  # [T, k, H]
    ref = (ref * w.double()[..., None]).sum(1) if weighted else ref.sum(1)
    assert rel_err(out, ref) < TOL[dtype]


def test_moe_unpermute_skips_dropped_slots_and_casts_output(device):
    y = torch.randn(6, 40).to(torch.bfloat16).to(device)
    combine = torch.tensor([[0, -1], [-1, -1], [5, 2]], device=device)
    out = moe_unpermute(y, combine, num_sms=2, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out[0], y[0].float())
    assert torch.equal(out[1], torch.zeros(40, device=device))
    assert rel_err(out[2], y[5].double() + y[2].double()) < 1e-6


def test_moe_round_trip_recovers_tokens(device):
    g = torch.Generator().manual_seed(11)
    T, H, topk, E = 10, 24, 2, 3
    x = torch.randn(T, H, generator=g).to(device)
    topk_ids = torch.randint(0, E, (T, topk), generator=g).to(device)
    src, combine, counts = moe_dispatch_index(topk_ids, E)
    permuted = moe_permute(x, src, num_sms=4)
    back = moe_unpermute(permuted, combine, torch.full((T, topk), 1.0 / topk, device=device), num_sms=4)
    assert rel_err(back, x.double()) < 1e-6


def test_moe_dispatch_index_layout():
    topk_ids = torch.tensor([[0, 3], [1, 0], [3, 3], [2, 1]])
    src, combine, counts = moe_dispatch_index(topk_ids, 4)
    assert counts.tolist() == [2, 2, 1, 3]
    assert src.tolist() == [0, 1, 1, 3, 3, 0, 2, 2]   # tokens grouped by expert, stable
    starts = torch.cumsum(counts, 0) - counts
    for t in range(4):
        for j in range(2):
            row = int(combine[t, j])
            assert int(src[row]) == t                 # the slot holds token t ...
            e = int(topk_ids[t, j])                   # ... inside expert e's range
            assert starts[e] <= row < starts[e] + counts[e]
    assert sorted(combine.view(-1).tolist()) == list(range(8))


def test_moe_rejects_bad_input(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(IndexError):
        moe_permute(x, torch.tensor([0, 4], device=device), check_bounds=True)
    with pytest.raises(ValueError, match="1-D int32/int64"):
        moe_permute(x, torch.tensor([0.0], device=device))
    with pytest.raises(ValueError, match="unit stride"):
        moe_permute(x.t(), torch.tensor([0], device=device))
    with pytest.raises(ValueError, match="shaped like combine_index"):
        moe_unpermute(x, torch.zeros(2, 2, dtype=torch.long, device=device), torch.ones(2, 3, device=device))
    with pytest.raises(IndexError):
        moe_unpermute(x, torch.tensor([[9]], device=device), check_bounds=True)
    with pytest.raises(TypeError):
        moe_unpermute(x.long(), torch.zeros(2, 1, dtype=torch.long, device=device))
    with pytest.raises(IndexError):
        moe_dispatch_index(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="num_experts"):
        moe_dispatch_index(torch.tensor([[0]]), 0)


def test_import_without_triton_fails_only_when_called():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # make `import triton` raise ImportError\n"
        "import torch\n"
        "from overlap import kernels\n"
        "assert not kernels.HAS_TRITON and 'not installed' in kernels.TRITON_ERROR\n"
        "try:\n"
        "    kernels.persistent_matmul(torch.ones(2, 2), torch.ones(2, 2))\n"
        "except kernels.TritonUnavailableError as exc:\n"
        "    print('raised:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised:" in out.stdout and "pip install triton" in out.stdout


def test_kernels_are_installed_only_under_the_overlap_namespace(tmp_path):
    """`kernels` is another project's top-level name (Hugging Face); we must not claim it."""
    code = ("import importlib.util, pathlib\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec is not None and pathlib.Path(spec.origin or '').resolve().is_relative_to(pathlib.Path(r'%s')))\n"
            "import overlap.kernels\n" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
