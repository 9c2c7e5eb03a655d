"""DUALPIPE_TRITON_PIN: every kernel is autotuned over its one known-good config only.

The timed GPU check (scripts/gpu_check.py) sets it so autotuning does not eat its window.
Building the autotuner objects needs triton but no GPU, so this runs on CPU.
"""
import importlib

import pytest

from overlap import kernels as K

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason=f"triton unavailable: {K.TRITON_ERROR}")


def _kernels():
    # the modules, not the functions of the same names that overlap.kernels re-exports
    MP = importlib.import_module("overlap.kernels.moe_permute")
    PM = importlib.import_module("overlap.kernels.persistent_matmul")
    return [(PM._persistent_matmul_kernel, PM.matmul_configs, PM.PINNED_MATMUL),
            (MP._permute_kernel, MP.permute_configs, MP.PINNED_PERMUTE),
            (MP._unpermute_kernel, MP.permute_configs, MP.PINNED_PERMUTE)]


def _kwargs(config):
    return (dict(config.kwargs), config.num_warps, config.num_stages)


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_pin_keeps_the_known_good_config_only(monkeypatch, value):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DUALPIPE_TRITON_PIN", value)
    for kernel, configs, known_good in _kernels():
        space = configs(False)
        assert len(space) > 1, "the generator still describes the whole space"
        assert kernel.known_good == known_good
        tuner = kernel.compiled()
        assert [_kwargs(c) for c in tuner.configs] == [_kwargs(space[known_good])]


def test_unpinned_and_pinned_kernels_are_cached_apart(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel, configs, _ = _kernels()[0]
    monkeypatch.setenv("DUALPIPE_TRITON_PIN", "0")
    full = kernel.compiled()
    assert len(full.configs) == len(configs(False)) > 1
    monkeypatch.setenv("DUALPIPE_TRITON_PIN", "1")
    one = kernel.compiled()
    assert len(one.configs) == 1
    monkeypatch.setenv("DUALPIPE_TRITON_PIN", "0")
    assert kernel.compiled() is full


def test_pin_leaves_the_interpreter_config_alone(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for kernel, configs, _ in _kernels():
        monkeypatch.delenv("DUALPIPE_TRITON_PIN", raising=False)
        interp = [_kwargs(c) for c in kernel.autotune_configs(True)]
        monkeypatch.setenv("DUALPIPE_TRITON_PIN", "1")
        assert [_kwargs(c) for c in kernel.autotune_configs(True)] == interp
        assert interp == [_kwargs(c) for c in configs(True)] and len(interp) == 1


def test_known_good_index_is_checked():
    from overlap.kernels._triton_support import autotune_space
    with pytest.raises(IndexError, match="outside the 2 configs"):
        autotune_space(["a", "b"], 2)
