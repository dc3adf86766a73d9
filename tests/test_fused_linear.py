"""fastkd.fused_linear_distillation_loss against the float64 oracle on materialised logits.

The oracle computes `logits = h @ W.T + b` in float64 and the textbook loss of tests/oracle.py,
differentiated by autograd with respect to student hidden, weight and bias. Covered: every
divergence and reduction, ignored rows (also all), target None, chunk sizes that do not divide
N, leading dimensions, bias, num_items_in_batch, options, bf16 (float32 accumulation of the
weight gradient), the teacher as a constant, validation errors, the module, no-grad and
torch.compile, and that no tensor of [N, V] elements is ever created.
"""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_loss, random_target, row_weights
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd._dispatch import unavailable_reason
from fastkd.ops.fused_linear import default_chunk_rows

BACKENDS = ["torch", "auto"]  # auto = the C++ "cpu" kernel when built, else the reference
DIVERGENCES = ["kl", "reverse_kl", "jsd", "tvd"]
STUDENT_KEYS = ("student_hidden", "student_weight", "student_bias")


def make_inputs(lead=(23,), hs=16, ht=24, vocab=40, dtype=torch.float32, bias=True, seed=0):
    """Normal hidden states and lm-heads scaled so logits have std ~3."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(
        student_hidden=normal(*lead, hs), student_weight=normal(vocab, hs, scale=3 / hs**0.5),
        student_bias=normal(vocab) if bias else None,
        teacher_hidden=normal(*lead, ht), teacher_weight=normal(vocab, ht, scale=3 / ht**0.5),
        teacher_bias=normal(vocab) if bias else None)


def oracle(inputs, target, **kw):
    """(loss, {name: grad}) in float64 through materialised logits."""
    leaves = {k: inputs[k].detach().double().requires_grad_(True)
              for k in STUDENT_KEYS if inputs[k] is not None}
    s = leaves["student_hidden"] @ leaves["student_weight"].T
    if "student_bias" in leaves:
        s = s + leaves["student_bias"]
    t = inputs["teacher_hidden"].double() @ inputs["teacher_weight"].double().T
    if inputs["teacher_bias"] is not None:
        t = t + inputs["teacher_bias"].double()
    loss = oracle_loss(s, t, target, **kw)
    scalar = loss if loss.dim() == 0 else (loss * row_weights(loss.shape)).sum()
    grads = torch.autograd.grad(scalar, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def run_fused(inputs, target, **kw):
    """(loss, {name: grad}) of fastkd with the student's tensors requiring grad."""
    leaves = {k: inputs[k].detach().clone().requires_grad_(True)
              for k in STUDENT_KEYS if inputs[k] is not None}
    call = dict(inputs, **leaves)
    loss = fastkd.fused_linear_distillation_loss(
        call["student_hidden"], call["student_weight"], call["teacher_hidden"],
        call["teacher_weight"], target, student_bias=call["student_bias"],
        teacher_bias=call["teacher_bias"], **kw)
    scalar = loss if loss.dim() == 0 else (loss.double() * row_weights(loss.shape)).sum()
    scalar.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def assert_close(actual, expected, rtol, atol=1e-30, what="value"):
    """max |actual - expected| <= rtol * max |expected| + atol (error relative to the
    tensor's own scale)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite values"
    err, scale = (a - e).abs().max(), e.abs().max()
    assert err <= rtol * scale + atol, f"{what}: error {err:.3e} > {rtol:g} * {scale:.3e}"


def check(inputs, target, rtol=1e-5, **kw):
    loss, grads = run_fused(inputs, target, **kw)
    kw.pop("backend", None)
    kw.pop("chunk_size", None)
    ref_loss, ref_grads = oracle(inputs, target, **kw)
    assert_close(loss, ref_loss, rtol, what="loss")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close(grads[name], ref_grads[name], rtol, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_oracle(divergence, reduction, backend):
    inputs = make_inputs(seed=DIVERGENCES.index(divergence))
    target = random_target(23, vocab=40, ignore_fraction=0.3)
    check(inputs, target, temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3,
          reduction=reduction, chunk_size=5, backend=backend)


TRITON_REASON = unavailable_reason("triton", torch.device("cpu"), torch.float32)


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_kernel_through_the_chunks(divergence, reduction):
    """The Triton dense kernel (interpreted on CPU) behind the same chunked sweep."""
    inputs = make_inputs(seed=12)
    target = random_target(23, vocab=40, ignore_fraction=0.3)
    check(inputs, target, temperature=2.0, alpha=0.3, divergence=divergence,
          reduction=reduction, chunk_size=5, backend="triton")


@pytest.mark.parametrize("chunk_size", [1, 7, 23, 64, None])
def test_chunk_sizes_and_leading_dims(chunk_size):
    inputs = make_inputs(lead=(3, 9), seed=1)
    target = random_target(3, 9, vocab=40, ignore_fraction=0.2)
    check(inputs, target, temperature=1.5, alpha=0.5, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_none_and_no_bias(reduction):
    inputs = make_inputs(lead=(2, 11), bias=False, seed=2)
    check(inputs, None, temperature=3.0, divergence="jsd", reduction=reduction, chunk_size=4)


def test_options_softcap_label_smoothing_num_items_float64():
    inputs = make_inputs(dtype=torch.float64, seed=3)
    target = random_target(23, vocab=40, ignore_fraction=0.25)
    check(inputs, target, rtol=1e-10, temperature=2.0, alpha=0.7, softcap=5.0,
          label_smoothing=0.1, scale_by_t2=False, num_items_in_batch=40, chunk_size=6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(reduction):
    inputs = make_inputs(seed=4)
    target = torch.full((23,), -100)
    loss, grads = run_fused(inputs, target, reduction=reduction, chunk_size=5)
    assert bool((loss == 0).all())
    for name, grad in grads.items():
        assert bool((grad == 0).all()), name


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_within_twice_eager_error(reduction):
    """bf16 in, bf16 grads out; error <= 2x that of the bf16 eager formula + rounding floor."""
    inputs = make_inputs(lead=(64,), hs=32, ht=32, vocab=96, dtype=torch.bfloat16, seed=5)
    target = random_target(64, vocab=96, ignore_fraction=0.1)
    kw = dict(temperature=2.0, alpha=0.4, reduction=reduction)
    loss, grads = run_fused(inputs, target, chunk_size=5, **kw)
    ref_loss, ref_grads = oracle(inputs, target, **kw)
    # The same formula eagerly in bf16: logits and loss in bf16, autograd.
    leaves = {k: inputs[k].detach().clone().requires_grad_(True)
              for k in ("student_hidden", "student_weight", "student_bias")}
    s = leaves["student_hidden"] @ leaves["student_weight"].T + leaves["student_bias"]
    t = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
    eager = oracle_loss(s, t, target, dtype=torch.bfloat16, **kw)
    scalar = eager if eager.dim() == 0 else (eager * row_weights(eager.shape).bfloat16()).sum()
    eager_grads = dict(zip(leaves, torch.autograd.grad(scalar, list(leaves.values()))))
    pairs = [("loss", loss, ref_loss, eager.detach())]
    pairs += [(k, grads[k], ref_grads[k], eager_grads[k]) for k in grads]
    for name, got, ref, eager_value in pairs:
        ref = ref.double()
        floor = 2.0**-9 * ref.abs().max()
        eager_err = (eager_value.double() - ref).abs().max()
        err = (got.double() - ref).abs().max()
        assert err <= 2 * eager_err + floor, f"{name}: {err:.3e} vs eager {eager_err:.3e}"
        if name != "loss":
            assert got.dtype == torch.bfloat16


def test_bf16_weight_gradient_accumulates_in_float32():
    """One row per chunk (64 partial sums) vs one chunk: with float32 accumulation both round
    the same float32 sum once to bf16, so they agree to one bf16 ulp."""
    inputs = make_inputs(lead=(64,), hs=32, ht=32, vocab=48, dtype=torch.bfloat16, seed=6)
    target = random_target(64, vocab=48)
    _, many = run_fused(inputs, target, chunk_size=1, reduction="sum")
    _, one = run_fused(inputs, target, chunk_size=64, reduction="sum")
    _, ref = oracle(inputs, target, reduction="sum")
    for name in ("student_weight", "student_bias"):
        ulp = 2.0**-7 * one[name].double().abs()
        assert bool(((many[name].double() - one[name].double()).abs() <= ulp + 1e-30).all())
        assert_close(many[name], ref[name], 2.0**-6, what=name)


def test_teacher_gets_no_gradient_even_if_it_requires_grad():
    inputs = make_inputs(seed=7)
    target = random_target(23, vocab=40)
    teacher = {k: inputs[k].clone().requires_grad_(True)
               for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss = fastkd.fused_linear_distillation_loss(
        hidden, inputs["student_weight"], teacher["teacher_hidden"], teacher["teacher_weight"],
        target, teacher_bias=teacher["teacher_bias"], student_bias=inputs["student_bias"])
    loss.backward()
    assert hidden.grad is not None
    assert all(t.grad is None for t in teacher.values())
    frozen_student = fastkd.fused_linear_distillation_loss(
        inputs["student_hidden"], inputs["student_weight"], teacher["teacher_hidden"],
        teacher["teacher_weight"], target, teacher_bias=teacher["teacher_bias"])
    assert not frozen_student.requires_grad  # no graph through the teacher's chunk logits


def test_no_grad_and_module_match_functional():
    inputs = make_inputs(seed=8)
    target = random_target(23, vocab=40, ignore_fraction=0.2)
    crit = fastkd.FusedLinearDistillationLoss(temperature=2.0, alpha=0.2, divergence="tvd",
                                              chunk_size=6)
    with_grad, _ = run_fused(inputs, target, temperature=2.0, alpha=0.2, divergence="tvd")
    with torch.no_grad():
        from_module = crit(inputs["student_hidden"], inputs["student_weight"],
                           inputs["teacher_hidden"], inputs["teacher_weight"], target,
                           student_bias=inputs["student_bias"],
                           teacher_bias=inputs["teacher_bias"])
    assert_close(from_module, with_grad, 1e-6)
    assert "chunk_size=6" in repr(crit)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor (of `dtype`, if given) an op
    produces."""

    def __init__(self, dtype=None):
        super().__init__()
        self.dtype = dtype
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.dtype in (None, t.dtype):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("components", [False, True], ids=["loss", "components"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_creates_full_logits(reduction, components):
    """Not even for the components: they come from the kernels' (N, 2) terms buffer."""
    inputs = make_inputs(lead=(96,), hs=8, ht=8, vocab=500, seed=9)
    target = random_target(96, vocab=500)
    with LargestTensor() as mode:
        if components:
            loss, ce, div = fastkd.fused_linear_distillation_loss(
                inputs["student_hidden"].requires_grad_(), inputs["student_weight"],
                inputs["teacher_hidden"], inputs["teacher_weight"], target, chunk_size=16,
                reduction=reduction, backend="torch", return_components=True)
            loss.sum().backward()
        else:
            run_fused(inputs, target, chunk_size=16, reduction=reduction, backend="torch")
    assert mode.largest <= 16 * 500, mode.largest


def test_default_chunk_rule():
    cpu = torch.device("cpu")
    assert default_chunk_rows(8192, 32000, 4, cpu, False) == 256
    assert default_chunk_rows(8192, 32000, 4, cpu, True) == 512
    assert default_chunk_rows(10, 32000, 4, cpu, False) == 10
    assert default_chunk_rows(8192, 128256, 2, torch.device("cuda"), False) == 1024
    assert default_chunk_rows(5, 10**9, 4, cpu, False) == 1


def test_torch_compile_fullgraph():
    inputs = make_inputs(lead=(12,), seed=10)
    target = random_target(12, vocab=40, ignore_fraction=0.2)

    def step(h, w, b, th, tw, tb, y):
        return fastkd.fused_linear_distillation_loss(h, w, th, tw, y, student_bias=b,
                                                     teacher_bias=tb, temperature=2.0,
                                                     chunk_size=5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [inputs[k].clone().requires_grad_(True)
              for k in ("student_hidden", "student_weight", "student_bias")]
    loss = compiled(leaves[0], leaves[1], leaves[2], inputs["teacher_hidden"],
                    inputs["teacher_weight"], inputs["teacher_bias"], target)
    loss.backward()
    ref_loss, ref_grads = oracle(inputs, target, temperature=2.0)
    assert_close(loss, ref_loss, 1e-5, what="loss")
    for leaf, ref in zip(leaves, ref_grads.values()):
        assert_close(leaf.grad, ref, 1e-5, what="grad")


def _call(**overrides):
    inputs = make_inputs(lead=(4,), hs=8, ht=8, vocab=10, seed=11)
    args = dict(inputs, target=None)
    args.update(overrides)
    keywords = {k: args.pop(k) for k in list(args) if k not in (
        "student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "target")}
    return fastkd.fused_linear_distillation_loss(
        args["student_hidden"], args["student_weight"], args["teacher_hidden"],
        args["teacher_weight"], args["target"], **keywords)


@pytest.mark.parametrize("overrides, error, name", [
    (dict(student_weight=torch.randn(10, 7)), ValueError, "student_weight"),
    (dict(student_weight=torch.ones(10, 8, dtype=torch.int32)), TypeError, "student_weight"),
    (dict(student_hidden=torch.ones(4, 8, dtype=torch.int64)), TypeError, "student_hidden"),
    (dict(student_bias=torch.randn(9)), ValueError, "student_bias"),
    (dict(teacher_bias=torch.ones(10, dtype=torch.int64)), TypeError, "teacher_bias"),
    (dict(teacher_weight=torch.randn(11, 8), teacher_bias=None), ValueError, "teacher_weight"),
    (dict(teacher_hidden=torch.randn(5, 8)), ValueError, "teacher_hidden"),
    (dict(teacher_hidden=torch.ones(4, 8, dtype=torch.bool)), TypeError, "teacher_hidden"),
    (dict(target=torch.zeros(4)), TypeError, "target"),
    (dict(target=torch.zeros(4, dtype=torch.int64), reduction="sum", num_items_in_batch=3),
     ValueError, "num_items_in_batch"),
    (dict(teacher_weight=torch.randn(10, 8, device="meta")), ValueError, "teacher_weight"),
    (dict(target=torch.zeros(5, dtype=torch.int64)), ValueError, "target"),
    (dict(target=torch.tensor([0, 1, 2, 10])), ValueError, "target"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_validation_errors_name_the_argument(overrides, error, name):
    with pytest.raises(error, match=name):
        _call(**overrides)


def test_shape_errors_say_what_differs():
    with pytest.raises(ValueError, match="leading shape") as info:
        _call(teacher_hidden=torch.randn(2, 2, 8))
    assert "vocabulary" not in str(info.value)
    with pytest.raises(ValueError, match="teacher_weight") as info:
        _call(teacher_weight=torch.randn(12, 8), teacher_bias=torch.randn(12))
    message = str(info.value)
    assert "teacher_weight[:10]" in message and "teacher_bias[:10]" in message
    assert "tokenizer" in message and "-inf" not in message and "pad the" not in message
    with pytest.raises(ValueError, match=r"student_weight\[:10\]"):
        _call(student_weight=torch.randn(13, 8), student_bias=None)
    inputs = make_inputs(lead=(4,), hs=8, ht=8, vocab=10, seed=11)
    padded_teacher = torch.cat([inputs["teacher_weight"], torch.randn(6, 8)])
    padded_bias = torch.cat([inputs["teacher_bias"], torch.randn(6)])
    torch.testing.assert_close(_call(teacher_weight=padded_teacher[:10],
                                     teacher_bias=padded_bias[:10]), _call())


ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


def mixed_inputs(student, teacher, seed):
    """Each side's (hidden, weight + bias) in the given dtypes. A side whose matmul runs in
    bf16/fp16 gets values whose products and sums are exact in that dtype (hidden in
    {-1, 0, 1}, weights and bias multiples of 1/4), so its logits carry no rounding; a side
    that computes in float32 gets general normal values, which a kernel that cast them down
    would visibly round. The loss is then held to float32 accuracy against the oracle."""
    inputs = make_inputs(lead=(24,), hs=16, ht=24, vocab=50, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for side, (h_dtype, w_dtype) in (("student", student), ("teacher", teacher)):
        keys = [f"{side}_hidden", f"{side}_weight", f"{side}_bias"]
        if torch.promote_types(h_dtype, w_dtype) != torch.float32:
            hidden, weight, bias = (inputs[k] for k in keys)
            inputs[keys[0]] = torch.randint(-1, 2, hidden.shape, generator=g).float()
            inputs[keys[1]] = torch.randint(-2, 3, weight.shape, generator=g) * 0.25
            inputs[keys[2]] = torch.randint(-8, 9, bias.shape, generator=g) * 0.25
        for key, dtype in zip(keys, (h_dtype, w_dtype, w_dtype)):
            inputs[key] = inputs[key].to(dtype)
    return inputs


SIDE_CASES = {
    "student-bf16-teacher-f32": ((torch.bfloat16,) * 2, (torch.float32,) * 2),
    "student-f32-teacher-bf16": ((torch.float32,) * 2, (torch.bfloat16,) * 2),
    "hidden-bf16-weight-f32-teacher-f16": ((torch.bfloat16, torch.float32),
                                           (torch.float16,) * 2),
    "student-f16-teacher-hidden-f32-weight-bf16": ((torch.float16,) * 2,
                                                   (torch.float32, torch.bfloat16)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(SIDE_CASES))
def test_mixed_dtypes_per_side(case, reduction, backend):
    """Each side's matmul in its promoted dtype (nothing cast down), the loss in float32,
    each gradient in its input's dtype."""
    student, teacher = SIDE_CASES[case]
    inputs = mixed_inputs(student, teacher, seed=13)
    target = random_target(24, vocab=50, ignore_fraction=0.2)
    kw = dict(temperature=2.0, alpha=0.4, reduction=reduction)
    loss, grads = run_fused(inputs, target, chunk_size=7, backend=backend, **kw)
    assert loss.dtype == torch.float32
    ref_loss, ref_grads = oracle(inputs, target, **kw)
    # float32 arithmetic on exact logits errs by ~3e-7 here; rounding either side's float32
    # head to bf16 moves the loss by ~7e-6 (measured), so the bound is tighter than 1e-5.
    assert_close(loss, ref_loss, 2e-6, what="loss")
    head = ROUNDING[torch.promote_types(*student)]
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        rtol = 1e-5 + 2 * head + 2 * ROUNDING[grad.dtype]
        assert_close(grad, ref_grads[name], rtol, what=name)


def test_float64_on_one_side_computes_in_float64():
    inputs = make_inputs(seed=14)
    inputs["teacher_weight"] = inputs["teacher_weight"].double()
    target = random_target(23, vocab=40, ignore_fraction=0.2)
    loss, grads = run_fused(inputs, target, temperature=2.0, chunk_size=5)
    assert loss.dtype == torch.float64
    ref_loss, ref_grads = oracle(inputs, target, temperature=2.0)
    assert_close(loss, ref_loss, 1e-12, what="loss")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert_close(grad, ref_grads[name], 2.0**-23, what=name)
    cpu_built = unavailable_reason("cpu", torch.device("cpu"), torch.float32) is None
    with pytest.raises(fastkd.BackendUnavailableError, match="float64" if cpu_built else ""):
        run_fused(inputs, target, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
def test_components(with_target, reduction, backend):
    """(loss, ce, divergence) equal the dense loss's components on the materialised logits,
    with the identity loss == alpha * ce + (1 - alpha) * T^2 * divergence."""
    inputs = make_inputs(seed=15)
    target = random_target(23, vocab=40, ignore_fraction=0.3) if with_target else None
    kw = dict(temperature=2.0, alpha=0.3, divergence="tvd", reduction=reduction,
              backend=backend)
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss, ce, div = fastkd.fused_linear_distillation_loss(
        hidden, inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
        target, student_bias=inputs["student_bias"], teacher_bias=inputs["teacher_bias"],
        chunk_size=6, return_components=True, **kw)
    assert not ce.requires_grad and not div.requires_grad and loss.requires_grad
    s = inputs["student_hidden"] @ inputs["student_weight"].T + inputs["student_bias"]
    t = inputs["teacher_hidden"] @ inputs["teacher_weight"].T + inputs["teacher_bias"]
    dense = fastkd.distillation_loss(s, t, target, return_components=True, **kw)
    for name, a, b in zip(("loss", "ce", "divergence"), (loss.detach(), ce, div), dense):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if with_target:
        torch.testing.assert_close(loss.detach(), 0.3 * ce + 0.7 * 4.0 * div, rtol=1e-6,
                                   atol=1e-6)
    else:
        assert bool((ce == 0).all())
        torch.testing.assert_close(loss.detach(), 4.0 * div, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert hidden.grad is not None


def test_components_module_and_no_grad():
    inputs = make_inputs(seed=16)
    target = random_target(23, vocab=40)
    crit = fastkd.FusedLinearDistillationLoss(temperature=2.0, chunk_size=8,
                                              return_components=True, backend="torch")
    args = (inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
            inputs["teacher_weight"], target)
    with torch.no_grad():
        got = crit(*args)
    expected = fastkd.fused_linear_distillation_loss(*args, temperature=2.0, chunk_size=8,
                                                     return_components=True, backend="torch")
    assert len(got) == 3
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=0)


def test_autocast_matmuls_like_nn_linear_loss_in_float32():
    """Under CPU bf16 autocast the lm-head matmuls run in bf16 like nn.Linear's (the inputs
    are cast), the loss is float32, and the float32 parameters get float32 gradients equal to
    those of the explicit bf16 cast."""
    inputs = make_inputs(seed=17)
    target = random_target(23, vocab=40, ignore_fraction=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = run_fused(inputs, target, temperature=2.0, chunk_size=5, backend="torch")
    assert loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in STUDENT_KEYS}
    cast = {k: (leaves[k] if k in leaves else inputs[k]).bfloat16() for k in inputs}
    explicit = fastkd.fused_linear_distillation_loss(
        cast["student_hidden"], cast["student_weight"], cast["teacher_hidden"],
        cast["teacher_weight"], target, student_bias=cast["student_bias"],
        teacher_bias=cast["teacher_bias"], temperature=2.0, chunk_size=5, backend="torch")
    explicit.backward()
    assert explicit.dtype == torch.float32
    torch.testing.assert_close(loss, explicit.detach(), rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, leaves[name].grad, rtol=0, atol=0, msg=name)
