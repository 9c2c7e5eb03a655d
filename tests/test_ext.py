"""The compiled extension (csrc/, torch.ops.dualpipe_ext) and its pure-torch fallbacks.

Data movement must be exact (torch.equal); the scatter-add must be bit-identical between
the extension and the fallback on CPU (same arithmetic: float32 accumulation in source
order, one rounding), and close to a float64 reference. CUDA variants run only where
torch.cuda.is_available(); nothing GPU-side runs on CPU machines.
"""
import importlib.util
import os
import pathlib

import pytest
import torch

from overlap import _ext
from overlap import build_info, format_build_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEEDS_EXT = pytest.mark.skipif(not _ext.extension_available(),
                               reason=f"extension not built: {_ext.extension_error()}")
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs CUDA (torch.cuda.is_available() is False)")
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_extension_is_built_by_the_install():
    """./run test installs with `pip install -e .`, which must build overlap._C."""
    if os.environ.get("DUALPIPE_NO_EXT"):
        pytest.skip("DUALPIPE_NO_EXT is set: the build was skipped on purpose")
    assert _ext.extension_available(), _ext.extension_error()
    expected = "cuda" if torch.version.cuda else "cpu"
    if os.environ.get("DUALPIPE_NO_CUDA"):
        expected = "cpu"
    assert _ext.extension_kind() in (expected, "cpu")
    for op in ("sm_copy_", "gather_rows", "scatter_add_rows_csr_", "smid_probe_", "nsmid_",
               "green_ctx_query", "green_ctx_create", "green_ctx_destroy"):
        assert hasattr(torch.ops.dualpipe_ext, op), op


def test_build_info_reports_the_build():
    info = build_info()
    assert info["extension"] == _ext.extension_kind()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_archs"], list)
    if info["extension"] == "cpu":
        assert info["cuda_archs"] == []
    if info["extension"] != "none":
        assert info["extension_torch_version"] == torch.__version__
    assert isinstance(info["torch_green_contexts"], bool)
    assert info["triton"] == (importlib.util.find_spec("triton") is not None)
    text = format_build_info(info)
    assert "extension: " in text and "triton_version: " in text


@NEEDS_EXT
def test_cpu_build_refuses_gpu_only_ops_with_a_reason():
    if _ext.extension_kind() != "cpu":
        pytest.skip("CUDA build: these ops are real")
    with pytest.raises(RuntimeError, match="no CUDA"):
        torch.ops.dualpipe_ext.green_ctx_query(0)
    with pytest.raises(_ext.ExtensionUnavailableError, match="CUDA build"):
        _ext.smid_probe(4)
    with pytest.raises(_ext.ExtensionUnavailableError, match="CUDA build"):
        _ext.sm_id_limit()


# ---- gather / copy ------------------------------------------------------------------

GATHER_CASES = [  # (src shape, dtype, index length)
    ((10, 7), torch.float32, 4),
    ((37, 3, 5), torch.bfloat16, 50),   # repeats, 3-D rows
    ((9,), torch.float16, 9),           # 1-D: rows of one element
    ((64, 129), torch.int8, 17),        # odd row bytes
    ((5, 4), torch.int64, 0),           # empty index
    ((0, 4), torch.float32, 0),         # empty source
]


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=NEEDS_EXT)])
@pytest.mark.parametrize("shape,dtype,n", GATHER_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gather_rows_is_exact(shape, dtype, n, index_dtype, use_ext):
    g = torch.Generator().manual_seed(1)
    src = (torch.randn(shape, generator=g) * 100).to(dtype)
    index = torch.randint(0, max(shape[0], 1), (n,), generator=g).to(index_dtype)
    out = _ext.gather_rows(src, index, num_sms=3, use_extension=use_ext)
    assert out.dtype == src.dtype and out.shape == (n, *shape[1:])
    assert torch.equal(out, src[index.long()])


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=NEEDS_EXT)])
def test_gather_rows_rejects_bad_input(use_ext):
    src = torch.randn(5, 3)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        _ext.gather_rows(src, torch.tensor([0, 5]), use_extension=use_ext)
    with pytest.raises(IndexError):
        _ext.gather_rows(src, torch.tensor([-1]), use_extension=use_ext)
    with pytest.raises(TypeError, match="int64 or int32"):
        _ext.gather_rows(src, torch.tensor([0.0]), use_extension=use_ext)
    with pytest.raises(ValueError, match="1-D"):
        _ext.gather_rows(src, torch.zeros(2, 2, dtype=torch.long), use_extension=use_ext)
    with pytest.raises(ValueError, match="contiguous"):
        _ext.gather_rows(src.t(), torch.tensor([0]), use_extension=use_ext)
    with pytest.raises(ValueError, match="num_sms"):
        _ext.gather_rows(src, torch.tensor([0]), num_sms=0, use_extension=use_ext)


@NEEDS_EXT
def test_extension_checks_bounds_itself_on_cpu():
    """Even with the Python check off, the CPU kernel refuses out-of-range rows."""
    with pytest.raises(RuntimeError, match="out of range"):
        _ext.gather_rows(torch.randn(5, 3), torch.tensor([7]), check_bounds=False, use_extension=True)


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=NEEDS_EXT)])
@pytest.mark.parametrize("numel", [0, 1, 15, 16, 17, 1000, 4099])
def test_sm_copy_is_exact(numel, use_ext):
    src = torch.arange(numel, dtype=torch.int16)
    dst = torch.empty(numel, dtype=torch.int16)
    assert _ext.sm_copy_(dst, src, num_sms=2, use_extension=use_ext) is dst
    assert torch.equal(dst, src)


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=NEEDS_EXT)])
def test_sm_copy_flat_between_shapes_and_errors(use_ext):
    src = torch.randn(6, 4)
    dst = torch.empty(3, 8)
    _ext.sm_copy_(dst, src, use_extension=use_ext)
    assert torch.equal(dst.view(-1), src.view(-1))
    with pytest.raises(ValueError, match="equal dtype and numel"):
        _ext.sm_copy_(torch.empty(5), src, use_extension=use_ext)
    with pytest.raises(ValueError, match="equal dtype and numel"):
        _ext.sm_copy_(torch.empty(24, dtype=torch.float64), src, use_extension=use_ext)


# ---- scatter-add ---------------------------------------------------------------------

def _scatter_inputs(out_rows, in_rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(out_rows, cols, generator=g) * 4).to(dtype)
    src = (torch.randn(in_rows, cols, generator=g) * 4).to(dtype)
    index = torch.randint(0, out_rows, (in_rows,), generator=g)
    return out, src, index


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("out_rows,in_rows,cols", [(1, 9, 5), (20, 50, 3), (64, 2000, 33), (7, 0, 4)])
def test_scatter_add_reference_accuracy(dtype, out_rows, in_rows, cols):
    out, src, index = _scatter_inputs(out_rows, in_rows, cols, dtype, seed=2)
    ref = out.double().index_add(0, index, src.double())
    got = _ext.scatter_add_rows_(out.clone(), src, index, num_sms=4)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
    err = (got.double() - ref).norm() / max(ref.norm(), 1e-30)
    assert err < tol, f"relative error {err} for {dtype}"


@NEEDS_EXT
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("out_rows,in_rows,cols", [(1, 9, 5), (20, 50, 3), (300, 5000, 65)])
def test_scatter_add_extension_is_bit_identical_to_fallback(dtype, out_rows, in_rows, cols):
    out, src, index = _scatter_inputs(out_rows, in_rows, cols, dtype, seed=3)
    a = _ext.scatter_add_rows_(out.clone(), src, index, use_extension=True)
    b = _ext.scatter_add_rows_(out.clone(), src, index, use_extension=False)
    assert torch.equal(a, b)


@NEEDS_EXT
def test_scatter_add_half_rounding_edges_match_torch():
    """fp16/bf16 results go through the extension's own float->half rounding: subnormals,
    ties, overflow to inf must agree with torch's conversion."""
    for dtype in (torch.float16, torch.bfloat16):
        finfo = torch.finfo(dtype)
        specials = torch.tensor([finfo.max, finfo.max, finfo.tiny, finfo.tiny / 3, -finfo.tiny / 7,
                                 2.0 ** -24, 2.0 ** -25, 1.0, 2.0 ** -11, -finfo.max, 65504.0, 16.0])
        g = torch.Generator().manual_seed(4)
        scales = torch.pow(10.0, torch.empty(8000).uniform_(-9, 4.5, generator=g))
        src = torch.cat([specials, (torch.randn(8000, generator=g) * scales).clamp(-6e4, 6e4),
                         (torch.randn(500, generator=g) * 3e4).clamp(-6e4, 6e4)]).to(dtype).view(-1, 1)
        assert torch.isfinite(src).all()  # sums may overflow to inf, but never inf - inf
        rows = src.shape[0] // 2  # ~2 terms per row: each float32 sum needs its own rounding
        index = torch.randint(0, rows, (src.shape[0],), generator=g)
        out = torch.zeros(rows, 1, dtype=dtype)
        a = _ext.scatter_add_rows_(out.clone(), src, index, use_extension=True)
        b = _ext.scatter_add_rows_(out.clone(), src, index, use_extension=False)
        assert torch.equal(a, b), dtype


def test_build_csr_groups_sources_by_destination():
    index = torch.tensor([3, 0, 3, 1, 0, 3])
    order, offsets = _ext.build_csr(index, 5)
    assert offsets.tolist() == [0, 2, 3, 3, 6, 6]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]  # stable: increasing source order per row


@pytest.mark.parametrize("use_ext", [False, pytest.param(True, marks=NEEDS_EXT)])
def test_scatter_add_rejects_bad_input(use_ext):
    out, src = torch.zeros(4, 3), torch.ones(5, 3)
    with pytest.raises(ValueError, match="entries"):
        _ext.scatter_add_rows_(out, src, torch.zeros(4, dtype=torch.long), use_extension=use_ext)
    with pytest.raises(IndexError):
        _ext.scatter_add_rows_(out, src, torch.full((5,), 4), use_extension=use_ext)
    with pytest.raises(TypeError, match="cast src"):
        _ext.scatter_add_rows_(out, src.double(), torch.zeros(5, dtype=torch.long), use_extension=use_ext)
    with pytest.raises(TypeError, match="supports"):
        _ext.scatter_add_rows_(out.long(), src.long(), torch.zeros(5, dtype=torch.long), use_extension=use_ext)
    with pytest.raises(ValueError, match="trailing"):
        _ext.scatter_add_rows_(out, torch.ones(5, 2), torch.zeros(5, dtype=torch.long), use_extension=use_ext)


@NEEDS_EXT
def test_ops_have_fake_kernels_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        src = torch.empty(10, 4, 2)
        out = torch.ops.dualpipe_ext.gather_rows(src, torch.empty(6, dtype=torch.long), 8)
        assert out.shape == (6, 4, 2)
        torch.ops.dualpipe_ext.sm_copy_(torch.empty(3), torch.empty(3), 1)


def test_use_extension_true_without_it_raises(monkeypatch):
    monkeypatch.setitem(_ext._state, "tried", True)
    monkeypatch.setitem(_ext._state, "module", None)
    monkeypatch.setitem(_ext._state, "error", "pretend it is missing")
    with pytest.raises(_ext.ExtensionUnavailableError, match="pip install --no-build-isolation"):
        _ext.gather_rows(torch.randn(2, 2), torch.tensor([1]), use_extension=True)
    # auto mode falls back silently and stays correct
    src = torch.randn(4, 2)
    assert torch.equal(_ext.gather_rows(src, torch.tensor([3, 0])), src[[3, 0]])
    assert _ext.extension_kind() == "none"


# ---- setup.py: which extension gets built ------------------------------------------

@pytest.fixture()
def setup_module(monkeypatch):
    for var in ("DUALPIPE_NO_EXT", "DUALPIPE_NO_CUDA", "TORCH_CUDA_ARCH_LIST", "DUALPIPE_EXT_OPTIONAL"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("dualpipe_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not __main__: setup() is not called
    return module


def test_setup_builds_cpu_extension_on_cpu_torch(setup_module, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    exts, cmdclass = setup_module._extension_build()
    assert [e.name for e in exts] == ["overlap._C"]
    assert not any(s.endswith(".cu") for s in exts[0].sources)
    assert "build_ext" in cmdclass


def test_setup_skip_flag(setup_module, monkeypatch):
    monkeypatch.setenv("DUALPIPE_NO_EXT", "1")
    assert setup_module._extension_build() == ([], {})


def test_setup_missing_nvcc_warns_and_builds_cpu(setup_module, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(setup_module, "_find_nvcc", lambda cuda_home: None)
    exts, _ = setup_module._extension_build()
    assert not any(s.endswith(".cu") for s in exts[0].sources)
    assert "nvcc was not found" in capsys.readouterr().err


def test_setup_cuda_branch_selects_every_cu_file(setup_module, monkeypatch):
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or setup_module._find_nvcc(cpp_extension.CUDA_HOME) is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    exts, _ = setup_module._extension_build()
    cu = sorted(pathlib.Path(s).name for s in exts[0].sources if s.endswith(".cu"))
    assert cu == sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert ("DUALPIPE_WITH_CUDA", None) in exts[0].define_macros
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # default without a visible GPU
    assert any(a.startswith("-DDUALPIPE_CUDA_ARCHS=9.0") for a in exts[0].extra_compile_args["cxx"])


def test_setup_macro_values_are_shell_safe(setup_module):
    assert setup_module._macro_safe("8.0;9.0+PTX") == "8.0,9.0+PTX"
    assert setup_module._macro_safe(" 9.0 10.0 ") == "9.0,10.0"
    assert setup_module._macro_safe('2.13.0+cu130"; rm') == "2.13.0+cu130,,,rm"


# ---- CUDA (skipped without a GPU) ------------------------------------------------------

@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("num_sms", [1, 3, None])
def test_cuda_ops_match_cpu_bit_for_bit(dtype, num_sms):
    if _ext.extension_kind() != "cuda":
        pytest.skip(f"needs the CUDA build of the extension (have {_ext.extension_kind()})")
    out, src, index = _scatter_inputs(300, 4000, 129, dtype, seed=5)
    cpu = _ext.scatter_add_rows_(out.clone(), src, index, use_extension=True)
    gpu = _ext.scatter_add_rows_(out.cuda(), src.cuda(), index.cuda(), num_sms=num_sms,
                                 use_extension=True)
    assert torch.equal(gpu.cpu(), cpu)
    gathered = _ext.gather_rows(src.cuda(), index.cuda(), num_sms=num_sms, use_extension=True)
    assert torch.equal(gathered.cpu(), src[index])
    raw = torch.randint(0, 255, (10_000,), dtype=torch.uint8).cuda()
    for offset_dst, offset_src, n in [(0, 0, 9000), (1, 1, 8999), (3, 5, 4000), (16, 0, 17)]:
        dst = torch.zeros_like(raw)
        _ext.sm_copy_(dst[offset_dst:offset_dst + n], raw[offset_src:offset_src + n],
                      num_sms=num_sms, use_extension=True)
        assert torch.equal(dst[offset_dst:offset_dst + n], raw[offset_src:offset_src + n])
        assert int(dst[:offset_dst].abs().sum()) == 0
