"""Inputs as users hold them, on every kernel backend available here (the C++ `cpu` kernel,
Triton through its interpreter) and the reference (`torch`):

- mixed dtypes: student and teacher each fp32 / bf16 / fp16, read in their own dtype, each
  gradient in its input's dtype; float64 on either side computes both in float64;
- strided rows (`logits[:, :-1]`, a slice of a wider buffer, a transposed batch) read where
  they are, and with `inplace_backward=True` the gradient lands in the user's storage;
- `return_components=True`: (loss, ce, divergence) with the identity
  loss == alpha * ce + (1 - alpha) * k * divergence;
- torch.autocast: the loss is computed and returned in float32.

Everything is compared with the float64 oracle of tests/oracle.py on the same values.
"""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_loss, oracle_with_grads, random_logits, random_target, row_weights

import fastkd
import fastkd.functional as functional
from fastkd._dispatch import BackendUnavailableError, unavailable_reason

CPU = torch.device("cpu")
BACKENDS = ["torch"] + [b for b in ("cpu", "triton")
                        if unavailable_reason(b, CPU, torch.float32) is None]
#: Largest relative rounding error of one value stored in the dtype (half an ulp at the
#: bottom of a binade). A gradient in that dtype is rounded up to three times: when the kernel
#: writes it, and when backward scales it by the incoming (rounded) gradient.
ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23,
            torch.float64: 2.0**-52}
KW = dict(temperature=2.0, alpha=0.3, divergence="kl", label_smoothing=0.1)


def run(student, teacher, target, *, teacher_grad=True, **kw):
    """(loss, student grad, teacher grad) with reduction="none" weighted by row_weights."""
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fastkd.distillation_loss(s, t, target, **kw)
    scalar = loss if loss.dim() == 0 else (loss.double() * row_weights(loss.shape)).sum()
    scalar.backward()
    return loss.detach(), s.grad, t.grad


def assert_within(actual, expected, rtol, what):
    """max |actual - expected| <= rtol * max |expected| (max-norm relative error)."""
    assert actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite"
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= rtol * scale, f"{what}: error {err:.3e} > {rtol:.2e} * {scale:.3e}"


def check_mixed(student, teacher, target, backend, **kw):
    """float32 arithmetic on exact inputs: the loss within 1e-5 of the float64 oracle on the
    same values; each gradient within that plus its roundings to its own dtype (a kernel that
    cast either side down would miss the loss bound by orders of magnitude)."""
    loss, gs, gt = run(student, teacher, target, backend=backend, **kw)
    ref, ref_gs, ref_gt = oracle_with_grads(student, teacher, target, **kw)
    wide = torch.float64 in (student.dtype, teacher.dtype)
    assert loss.dtype == (torch.float64 if wide else torch.float32)
    assert gs.dtype == student.dtype and gt.dtype == teacher.dtype
    rtol = 1e-12 if wide else 1e-5
    assert_within(loss, ref, rtol, "loss")
    assert_within(gs, ref_gs, rtol + 3 * ROUNDING[student.dtype], "student grad")
    assert_within(gt, ref_gt, rtol + 3 * ROUNDING[teacher.dtype], "teacher grad")


DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
               (torch.float16, torch.bfloat16), (torch.float32, torch.float16)]
PAIR_IDS = ["bf16-f32", "f32-bf16", "f16-bf16", "f32-f16"]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend, dtypes, reduction):
    student = random_logits(3, 5, 67, dtype=dtypes[0], seed=1)
    teacher = random_logits(3, 5, 67, dtype=dtypes[1], seed=2)
    target = random_target(3, 5, vocab=67, ignore_fraction=0.2, seed=3)
    for divergence in ("kl", "jsd"):
        check_mixed(student, teacher, target, backend, reduction=reduction,
                    **dict(KW, divergence=divergence))


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32),
                                    (torch.bfloat16, torch.float64)], ids=["f64-f32", "bf16-f64"])
def test_float64_on_either_side(dtypes):
    student = random_logits(4, 6, 31, dtype=dtypes[0], seed=4)
    teacher = random_logits(4, 6, 31, dtype=dtypes[1], seed=5)
    target = random_target(4, 6, vocab=31, ignore_fraction=0.2, seed=6)
    assert fastkd.resolve_backend("auto", student) != "torch" or dtypes[0] == torch.float64
    check_mixed(student, teacher, target, "auto", **KW)  # auto routes to the reference
    for backend in BACKENDS[1:]:
        with pytest.raises(BackendUnavailableError, match="float64"):
            fastkd.distillation_loss(student, teacher, target, backend=backend)


class KernelRecorder:
    """Wraps the backend's kernel: records (student, grad_student) of every call."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = functional.kernel_for

        def kernel_for(family, backend, *tensors, **keywords):
            kernel = original(family, backend, *tensors, **keywords)

            def recorded(student, teacher, target, grad_student, *rest):
                self.calls.append((student, teacher, grad_student))
                return kernel(student, teacher, target, grad_student, *rest)

            return recorded

        monkeypatch.setattr(functional, "kernel_for", kernel_for)


@pytest.mark.parametrize("layout", ["causal-slice", "wide-buffer", "transposed-batch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_are_read_and_written_in_place(backend, layout, monkeypatch):
    """No copy: the kernel gets views into the user's storage (checked by data pointer),
    once per outer index when the leading dimensions cannot merge; with inplace_backward
    the gradient is written into that storage."""
    recorder = KernelRecorder(monkeypatch)
    base = random_logits(3, 4, 41, seed=7).requires_grad_(True)
    full = base * 1.0  # a non-leaf that owns its storage, like lm-head output
    teacher_full = random_logits(3, 4, 41, seed=8)
    if layout == "causal-slice":
        view, t_view, calls = full[:, :-1], teacher_full[:, :-1], 3
        rows = [full[b, :-1] for b in range(3)]
    elif layout == "wide-buffer":
        view, t_view, calls = full[..., :-3], teacher_full[..., :-3], 1
        rows = [full[..., :-3].reshape(-1, 38)]
    else:
        view, t_view, calls = full.transpose(0, 1), teacher_full.transpose(0, 1), 4
        rows = [full[:, b] for b in range(4)]
    lead = view.shape[:-1]
    target = random_target(*lead, vocab=view.shape[-1], ignore_fraction=0.2, seed=9)
    expected = oracle_with_grads(view.detach(), t_view, target, teacher_grad=False, **KW)
    loss = fastkd.distillation_loss(view, t_view, target, backend=backend,
                                    inplace_backward=True, **KW)
    assert len(recorder.calls) == calls
    for (student, teacher, grad_student), row_block in zip(recorder.calls, rows):
        assert student.data_ptr() == row_block.data_ptr() and student.stride(-1) == 1
        assert student.stride() == row_block.stride()
        assert grad_student.data_ptr() == student.data_ptr()
        assert grad_student.stride() == student.stride()
        assert teacher.stride(-1) == 1
    before = full.detach().clone()
    loss.backward()
    assert_within(loss, expected[0], 1e-5, "loss")
    grad_of_view = {"causal-slice": lambda g: g[:, :-1], "wide-buffer": lambda g: g[..., :-3],
                    "transposed-batch": lambda g: g.transpose(0, 1)}[layout]
    assert_within(grad_of_view(base.grad), expected[1], 1e-5, "student grad")
    # The gradient now sits in the user's buffer; what the view does not cover is untouched.
    written = full.detach()
    if layout == "causal-slice":
        assert_within(written[:, :-1], expected[1], 1e-5, "gradient in storage")
        assert torch.equal(written[:, -1], before[:, -1])
    elif layout == "wide-buffer":
        assert_within(written[..., :-3], expected[1], 1e-5, "gradient in storage")
        assert torch.equal(written[..., -3:], before[..., -3:])
    else:
        assert_within(written.transpose(0, 1), expected[1], 1e-5, "gradient in storage")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_need_a_copy(backend):
    """A strided last dimension, or leading dimensions that split no way: read from a copy
    (same values), and inplace_backward=True refuses with the reason."""
    teacher = random_logits(2, 3, 4, 19, seed=10)
    cases = {
        "strided last dimension": random_logits(19, 2, 3, 4, seed=11).permute(1, 2, 3, 0),
        "leading dimensions": random_logits(2, 4, 5, 19, seed=12)[:, :-1, :-1],
    }
    target = random_target(2, 3, 4, vocab=19, ignore_fraction=0.2, seed=13)
    for name, student in cases.items():
        assert student.shape == teacher.shape, name
        loss, gs, _ = run(student, teacher, target, backend=backend, teacher_grad=False, **KW)
        ref, ref_gs, _ = oracle_with_grads(student, teacher, target, teacher_grad=False, **KW)
        assert_within(loss, ref, 1e-5, name)
        assert_within(gs, ref_gs, 1e-5, name)
        with pytest.raises(ValueError, match="inplace_backward") as info:
            fastkd.distillation_loss(student, teacher, target, backend=backend,
                                     inplace_backward=True, **KW)
        assert "copy" in str(info.value)


def test_inplace_backward_refuses_an_upcast_or_broadcast_student():
    student = random_logits(4, 9, seed=14)
    teacher = random_logits(4, 9, dtype=torch.float64, seed=15)
    with pytest.raises(ValueError, match="inplace_backward.*float64"):
        fastkd.distillation_loss(student, teacher, inplace_backward=True)
    broadcast = random_logits(1, 9, seed=16).expand(4, 9)
    with pytest.raises(ValueError, match="inplace_backward.*broadcast"):
        fastkd.distillation_loss(broadcast, teacher.float(), inplace_backward=True)
    # read (not written) where it is, the broadcast student is fine
    loss = fastkd.distillation_loss(broadcast, teacher.float(), backend="torch")
    expected = oracle_loss(broadcast.contiguous(), teacher.float())
    assert_within(loss, expected, 1e-5, "broadcast student")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_components_identity(backend, with_target, reduction):
    student = random_logits(2, 5, 37, seed=16)
    teacher = random_logits(2, 5, 37, seed=17)
    target = random_target(2, 5, vocab=37, ignore_fraction=0.3, seed=18) if with_target \
        else None
    kw = dict(temperature=3.0, alpha=0.4, divergence="jsd", beta=0.3, reduction=reduction,
              backend=backend)
    s = student.clone().requires_grad_(True)
    loss, ce, div = fastkd.distillation_loss(s, teacher, target, return_components=True, **kw)
    plain = fastkd.distillation_loss(student, teacher, target, **kw)
    assert torch.equal(loss.detach(), plain)
    assert loss.requires_grad and not ce.requires_grad and not div.requires_grad
    assert ce.shape == loss.shape == div.shape and ce.dtype == div.dtype == torch.float32
    k = 9.0
    if with_target:
        torch.testing.assert_close(loss.detach(), 0.4 * ce + 0.6 * k * div, rtol=1e-6,
                                   atol=1e-7)
        ref_ce = oracle_loss(student, teacher, target, temperature=3.0, alpha=1.0,
                             reduction=reduction)
        assert_within(ce, ref_ce, 1e-5, "ce")
    else:
        assert bool((ce == 0).all())
        torch.testing.assert_close(loss.detach(), k * div, rtol=1e-6, atol=1e-7)
    ref_div = oracle_loss(student, teacher, target, temperature=3.0, alpha=0.0,
                          divergence="jsd", beta=0.3, scale_by_t2=False, reduction=reduction)
    assert_within(div, ref_div, 1e-5, "divergence")
    loss.sum().backward()  # the loss still differentiates as before
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_components_zero_weight_terms_and_num_items(backend):
    """alpha = 1 / alpha = 0 still report both terms; num_items_in_batch divides them too."""
    student, teacher = random_logits(12, 23, seed=19), random_logits(12, 23, seed=20)
    target = random_target(12, vocab=23, ignore_fraction=0.25, seed=21)
    reference = fastkd.distillation_loss(student, teacher, target, temperature=2.0,
                                         return_components=True, backend=backend)
    for alpha in (0.0, 1.0):
        _, ce, div = fastkd.distillation_loss(student, teacher, target, temperature=2.0,
                                              alpha=alpha, return_components=True,
                                              backend=backend)
        torch.testing.assert_close(ce, reference[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(div, reference[2], rtol=1e-6, atol=0)
    loss, ce, div = fastkd.distillation_loss(student, teacher, target, temperature=2.0,
                                             num_items_in_batch=40, return_components=True,
                                             backend=backend)
    valid = (target != -100).sum()
    torch.testing.assert_close(ce * 40, reference[1] * valid, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, 0.5 * ce + 0.5 * 4 * div, rtol=1e-6, atol=1e-7)


def test_components_module():
    student, teacher = random_logits(6, 15, seed=22), random_logits(6, 15, seed=23)
    target = random_target(6, vocab=15, seed=24)
    crit = fastkd.DistillationLoss(temperature=2.0, alpha=0.2, return_components=True,
                                   backend="torch")
    got = crit(student, teacher, target)
    expected = fastkd.distillation_loss(student, teacher, target, temperature=2.0, alpha=0.2,
                                        return_components=True, backend="torch")
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert "return_components=True" in repr(crit)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_cpu_bf16_returns_float32(backend):
    """Logits from an lm-head under CPU autocast are bf16; the loss is float32 and equals the
    loss of those bf16 logits outside autocast (the same kernel reads the same values)."""
    hidden = random_logits(6, 16, scale=1.0, seed=25)
    head = torch.nn.Linear(16, 29)
    teacher = random_logits(6, 29, seed=26)  # a teacher kept in float32
    target = random_target(6, vocab=29, seed=27)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(hidden)
        assert logits.dtype == torch.bfloat16
        loss, ce, div = fastkd.distillation_loss(logits, teacher, target, backend=backend,
                                                 return_components=True, **KW)
    assert loss.dtype == ce.dtype == div.dtype == torch.float32
    loss.backward()
    assert head.weight.grad.dtype == torch.float32
    outside = fastkd.distillation_loss(logits.detach(), teacher, target, backend=backend, **KW)
    torch.testing.assert_close(loss.detach(), outside, rtol=1e-6, atol=0)
    assert_within(outside, oracle_loss(logits.detach(), teacher, target, **KW), 1e-5, "loss")


def test_dtensor_is_routed_to_the_registered_routes(monkeypatch):
    """A DTensor argument hands the whole call (every keyword) to the route fastkd._dtensor
    registered in fastkd._dispatch."""
    import sys
    import types

    from fastkd import _dispatch

    class FakeDTensor(torch.Tensor):
        pass

    fake_module = types.ModuleType("torch.distributed.tensor")
    fake_module.DTensor = FakeDTensor
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", fake_module)
    seen = {}

    def route(name):
        def routed(*args, **kwargs):
            seen[name] = (args, kwargs)
            return "routed"
        return routed

    assert _dispatch.dtensor_route("logits") is fastkd._dtensor.dtensor_distillation_loss
    monkeypatch.setitem(_dispatch._DTENSOR_ROUTES, "logits", route("dense"))
    monkeypatch.setitem(_dispatch._DTENSOR_ROUTES, "fused_linear", route("fused"))
    logits = random_logits(3, 7, seed=28)
    dt = torch.Tensor._make_subclass(FakeDTensor, logits)
    assert fastkd.distillation_loss(dt, logits, None, temperature=3.0,
                                    return_components=True) == "routed"
    args, kwargs = seen["dense"]
    assert args[0] is dt and kwargs["temperature"] == 3.0 and kwargs["return_components"]
    assert {"alpha", "divergence", "beta", "scale_by_t2", "ignore_index", "label_smoothing",
            "softcap", "reduction", "num_items_in_batch", "backend",
            "inplace_backward"} <= kwargs.keys()
    weight = torch.Tensor._make_subclass(FakeDTensor, random_logits(7, 4, seed=29))
    hidden = random_logits(3, 4, seed=30)
    assert fastkd.fused_linear_distillation_loss(hidden, weight, hidden, weight,
                                                 chunk_size=2) == "routed"
    assert seen["fused"][1]["chunk_size"] == 2
    # plain tensors are not routed
    assert torch.is_tensor(fastkd.distillation_loss(logits, logits, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
def test_sparse_components_equal_dense_when_k_is_v(with_target, backend):
    """With k = V every tail is empty: the top-k losses' (loss, ce, divergence) equal the
    dense loss's, for the logits and the fused-linear forms ("auto": the fused top-k kernel
    where one is built)."""
    n, v, temperature = 10, 21, 2.0
    hidden, weight = random_logits(n, 8, scale=1.0, seed=31), random_logits(v, 8, seed=32)
    student = hidden @ weight.T
    teacher = random_logits(n, v, seed=33)
    order = torch.argsort(torch.rand(n, v, generator=torch.Generator().manual_seed(34)), -1)
    logprobs = torch.log_softmax(teacher / temperature, -1).gather(-1, order)
    target = random_target(n, vocab=v, ignore_fraction=0.3, seed=35) if with_target else None
    kw = dict(temperature=temperature, alpha=0.3, return_components=True, backend=backend)
    dense = fastkd.distillation_loss(student, teacher, target, **dict(kw, backend="torch"))
    sparse = fastkd.sparse_distillation_loss(student, logprobs, order, target, **kw)
    fused = fastkd.fused_linear_sparse_distillation_loss(hidden, weight, logprobs, order,
                                                         target, chunk_size=3, **kw)
    for got in (sparse, fused):
        assert len(got) == 3 and not got[1].requires_grad and not got[2].requires_grad
        for name, a, b in zip(("loss", "ce", "divergence"), got, dense):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_top_k_losses_return_float32():
    """Top-k losses under CPU bf16 autocast: float32 loss; the fused form's lm-head matmul
    runs in bf16 like nn.Linear's (same value as an explicit bf16 cast outside autocast)."""
    n, v = 8, 19
    hidden, weight = random_logits(n, 6, scale=1.0, seed=36), random_logits(v, 6, seed=37)
    logprobs, indices = torch.log_softmax(random_logits(n, v, seed=38), -1).topk(5, dim=-1)
    target = random_target(n, vocab=v, seed=39)
    kw = dict(temperature=1.0, tail="renormalize", backend="torch", chunk_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight)
        dense = fastkd.sparse_distillation_loss(logits, logprobs, indices, target,
                                                tail="renormalize", backend="torch")
        fused = fastkd.fused_linear_sparse_distillation_loss(hidden, weight, logprobs,
                                                             indices, target, **kw)
    assert logits.dtype == torch.bfloat16
    assert dense.dtype == torch.float32 and fused.dtype == torch.float32
    explicit = fastkd.fused_linear_sparse_distillation_loss(hidden.bfloat16(),
                                                            weight.bfloat16(), logprobs,
                                                            indices, target, **kw)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=0)
    torch.testing.assert_close(dense, explicit, rtol=1e-5, atol=0)


def test_components_need_no_extra_full_size_tensor(monkeypatch):
    """The components come from the kernel's (N, 2) terms buffer in the same pass: with them,
    exactly as many (N, V)-sized tensors are created as without (the gradient buffer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import fastkd.reference.dense as reference_dense

    monkeypatch.setattr(reference_dense, "CHUNK_ELEMENTS", 64)  # 1 row per chunk
    n, v = 12, 97

    class CountFullSize(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= n * v:
                    self.count += 1
            return out

    student, teacher = random_logits(n, v, seed=40), random_logits(n, v, seed=41)
    target = random_target(n, vocab=v, seed=42)
    counts = []
    for components in (False, True):
        s = student.clone().requires_grad_(True)
        with CountFullSize() as mode:
            out = fastkd.distillation_loss(s, teacher, target, backend="torch",
                                           return_components=components)
            (out[0] if components else out).backward()
        counts.append(mode.count)
    assert counts[0] == counts[1] and counts[0] >= 1, counts
