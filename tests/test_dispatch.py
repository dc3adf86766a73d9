"""Backend resolution (fastkd._dispatch): auto, explicit names, FASTKD_BACKEND, clear errors.

An explicitly requested backend that cannot run the tensors raises BackendUnavailableError
with the reason; nothing falls back silently. `_dispatch` caches only import status, so the
environment variables can be changed per test with monkeypatch.
"""

from __future__ import annotations

import pytest
import torch
from oracle import random_logits, random_target

import fastkd
from fastkd import _dispatch


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)


def cpu_tensor(dtype=torch.float32):
    return random_logits(4, 9, dtype=dtype)


def test_auto_routes_float64_to_reference():
    assert fastkd.resolve_backend("auto", cpu_tensor(torch.float64)) == "torch"


def test_auto_on_cpu_prefers_fused_kernel_when_built():
    cpu_ok = _dispatch.unavailable_reason("cpu", torch.device("cpu"), torch.float32) is None
    expected = "cpu" if cpu_ok else "torch"
    assert fastkd.resolve_backend("auto", cpu_tensor()) == expected


def test_auto_loss_on_float64_equals_reference():
    student, teacher = cpu_tensor(torch.float64), random_logits(4, 9, dtype=torch.float64,
                                                                seed=1)
    target = random_target(4, vocab=9, ignore_fraction=0.3)
    auto = fastkd.distillation_loss(student, teacher, target, temperature=2.0)
    ref = fastkd.distillation_loss(student, teacher, target, temperature=2.0, backend="torch")
    assert auto.dtype == torch.float64 and torch.equal(auto, ref)


def test_explicit_torch_always_available():
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert fastkd.resolve_backend("torch", cpu_tensor(dtype)) == "torch"


def test_kernel_for_every_family_on_the_torch_backend_is_the_reference():
    from fastkd.reference.sparse import sparse_kd_rows

    assert _dispatch.kernel_for("dense", "torch", cpu_tensor()) is fastkd.reference.dense_kd_rows
    assert _dispatch.kernel_for("topk", "torch", cpu_tensor()) is sparse_kd_rows


def test_one_error_for_a_backend_without_a_kernel_of_the_family():
    """'cuda' has no top-k kernel: named explicitly it raises, saying which backends serve
    the family; 'auto' never picks it."""
    with pytest.raises(fastkd.BackendUnavailableError, match="no topk kernel.*'triton', 'cpu'"):
        _dispatch.kernel_for("topk", "cuda", cpu_tensor())
    reason = _dispatch.unavailable_reason("cuda", torch.device("cuda"), torch.float32, "topk")
    assert "no topk kernel" in reason


def test_cuda_on_cpu_tensors_raises_with_reason():
    with pytest.raises(fastkd.BackendUnavailableError, match="'cuda'.*CUDA tensors"):
        fastkd.resolve_backend("cuda", cpu_tensor())


def test_cuda_requested_in_loss_never_falls_back():
    student, teacher = cpu_tensor(), random_logits(4, 9, seed=1)
    with pytest.raises(fastkd.BackendUnavailableError, match="cuda"):
        fastkd.distillation_loss(student, teacher, backend="cuda")


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(fastkd.BackendUnavailableError, RuntimeError)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fastkd.BackendUnavailableError, match="TRITON_INTERPRET"):
        fastkd.resolve_backend("triton", cpu_tensor())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastkd.BackendUnavailableError, match="TRITON_INTERPRET"):
        fastkd.resolve_backend("triton", cpu_tensor())


def test_triton_on_cpu_with_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 the device is acceptable; the only possible reason left is
    that Triton (or the Triton op module) does not import."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = _dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32)
    if reason is None:
        assert fastkd.resolve_backend("triton", cpu_tensor()) == "triton"
    else:
        assert "not importable" in reason
        with pytest.raises(fastkd.BackendUnavailableError, match="not importable"):
            fastkd.resolve_backend("triton", cpu_tensor())


@pytest.mark.parametrize("backend", ["triton", "cuda", "cpu"])
def test_kernel_backends_refuse_float64(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(fastkd.BackendUnavailableError, match="float64"):
        fastkd.resolve_backend(backend, cpu_tensor(torch.float64))


def test_cpu_backend_needs_cpu_tensors():
    reason = _dispatch.unavailable_reason("cpu", torch.device("meta"), torch.float32)
    assert reason is not None and "CPU tensors" in reason


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert fastkd.resolve_backend("auto", cpu_tensor()) == "torch"


def test_env_does_not_override_explicit_backend(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    assert fastkd.resolve_backend("torch", cpu_tensor()) == "torch"


def test_env_naming_unavailable_backend_raises(monkeypatch):
    """FASTKD_BACKEND names a backend explicitly: unavailable is an error, not a fallback."""
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    with pytest.raises(fastkd.BackendUnavailableError, match="cuda"):
        fastkd.resolve_backend("auto", cpu_tensor())


def test_env_auto_is_auto(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "auto")
    assert fastkd.resolve_backend("auto", cpu_tensor(torch.float64)) == "torch"


@pytest.mark.parametrize("value", ["gpu", "Torch", ""])
def test_invalid_env_raises(monkeypatch, value):
    monkeypatch.setenv("FASTKD_BACKEND", value)
    with pytest.raises(ValueError, match="FASTKD_BACKEND"):
        fastkd.resolve_backend("auto", cpu_tensor())


@pytest.mark.parametrize("value", ["gpu", "CPU", None, 3])
def test_unknown_backend_name(value):
    with pytest.raises(ValueError, match=r"\bbackend\b"):
        fastkd.resolve_backend(value, cpu_tensor())


def test_newer_divergences_route_to_the_backends_that_compute_them():
    """'auto' picks a backend whose kernel computes the divergence; a named one that does not
    raises naming the divergence; a family with no kernel for it (top-k, this round) raises
    ValueError on every backend, as do the vocab-parallel losses."""
    student = random_logits(4, 30, seed=3)
    teacher = random_logits(4, 30, seed=4)
    target = random_target(4, vocab=30, seed=5)
    kw = dict(divergence="skew_kl", skew=0.2, temperature=2.0)
    exact = fastkd.distillation_loss(student.double(), teacher.double(), target, **kw)
    got = fastkd.distillation_loss(student, teacher, target, backend="auto", **kw)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)
    with pytest.raises(fastkd.BackendUnavailableError, match="skew_kl"):
        fastkd.distillation_loss(student, teacher, target, backend="triton", **kw)
    logprobs, indices = fastkd.topk_teacher_logprobs_from_logits(teacher / 2.0, 5)
    for backend in ("auto", "torch", "cpu"):
        with pytest.raises(ValueError, match="skew_kl.*no topk kernel"):
            fastkd.sparse_distillation_loss(student, logprobs, indices, target,
                                            backend=backend, **kw)
    from fastkd import distributed

    with pytest.raises(ValueError, match="skew_kl.*no vocab-parallel form"):
        distributed.vocab_parallel_distillation_loss(student, teacher, target,
                                                     vocab_start_index=0, **kw)
