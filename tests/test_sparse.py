"""fastkd.sparse_distillation_loss (top-k / offline teacher) and its fused-linear variant.

Checked against (a) the dense float64 oracle of tests/oracle.py when k = V (both tails equal
the dense loss), (b) the property bucket <= dense for k < V, and (c) an independent float64
formula written here (the k+1 categories summed directly, differentiated by autograd) for
losses and student gradients. Also ignored rows, validation errors, the module, the memory
rule (no float32 [N, V] temporary) and the fused-linear variant against materialised logits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import _xlogy_diff, oracle_with_grads, random_logits, random_target, row_weights
from test_fused_linear import LargestTensor, assert_close

import fastkd
import fastkd.reference.sparse

DIVERGENCES = ["kl", "reverse_kl", "jsd", "tvd"]
TAILS = ["bucket", "renormalize"]


def teacher_topk(teacher_logits, k, temperature=1.0, softcap=None, shuffle_seed=None):
    """Top-k of the teacher's log-softmax at T (optionally in a shuffled order)."""
    t = teacher_logits.double()
    if softcap is not None:
        t = softcap * torch.tanh(t / softcap)
    logprobs, indices = torch.log_softmax(t / temperature, dim=-1).topk(k, dim=-1)
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        order = torch.rand(indices.shape, generator=g).argsort(dim=-1)
        logprobs, indices = logprobs.gather(-1, order), indices.gather(-1, order)
    return logprobs.to(teacher_logits.dtype), indices


def sparse_divergence(s, logprobs, indices, tail, temperature, divergence, beta):
    """D over the k+1 categories, float64, from the textbook definitions."""
    vocab, k = s.shape[-1], indices.shape[-1]
    q_full = torch.softmax(s / temperature, dim=-1)
    q_top = q_full.gather(-1, indices)
    uncovered = torch.ones_like(q_full).scatter(-1, indices, 0.0)
    q_tail = (q_full * uncovered).sum(-1, keepdim=True)
    p_top = logprobs.double().exp()
    if tail == "renormalize":
        p_top = p_top / p_top.sum(-1, keepdim=True)
        p_tail = torch.zeros_like(q_tail)
    elif k == vocab:
        p_tail = torch.zeros_like(q_tail)
    else:
        p_tail = 1.0 - p_top.sum(-1, keepdim=True)
    p, q = torch.cat([p_top, p_tail], -1), torch.cat([q_top, q_tail], -1)

    def log(x):  # log with a finite value where x = 0 (masked out by _xlogy_diff)
        return torch.log(torch.where(x > 0, x, 1.0))

    if divergence == "kl":
        return _xlogy_diff(p, log(p), log(q))
    if divergence == "reverse_kl":
        if tail == "renormalize":
            return _xlogy_diff(q[..., :k], log(q[..., :k]), log(p[..., :k])) + q_tail[..., 0]
        return _xlogy_diff(q, log(q), log(p))
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _xlogy_diff(p, log(p), log(m)) + (1 - beta) * _xlogy_diff(q, log(q), log(m))
    return 0.5 * (p - q).abs().sum(-1)


def sparse_oracle(student, logprobs, indices, target=None, *, tail="bucket", temperature=1.0,
                  alpha=0.5, divergence="kl", beta=0.5, scale_by_t2=True, ignore_index=-100,
                  label_smoothing=0.0, reduction="mean", num_items_in_batch=None):
    """(loss, d loss / d student) in float64; reduction="none" weighted by row_weights."""
    s = student.detach().double().requires_grad_(True)
    k_t2 = temperature**2 if scale_by_t2 else 1.0
    d = sparse_divergence(s, logprobs, indices, tail, temperature, divergence, beta)
    if target is None:
        rows, count = k_t2 * d, float(d.numel())
    else:
        valid = target != ignore_index
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), torch.where(valid, target, 0).reshape(-1),
                             reduction="none", label_smoothing=label_smoothing)
        rows = torch.where(valid, alpha * ce.reshape(target.shape) + (1 - alpha) * k_t2 * d, 0.0)
        count = max(float(valid.sum()), 1.0)
    if reduction == "none":
        loss, scalar = rows, (rows * row_weights(rows.shape)).sum()
    else:
        loss = rows.sum() if reduction == "sum" else rows.sum() / (num_items_in_batch or count)
        scalar = loss
    (grad,) = torch.autograd.grad(scalar, s)
    return loss.detach(), grad


def run_sparse(student, logprobs, indices, target=None, **kw):
    s = student.detach().clone().requires_grad_(True)
    loss = fastkd.sparse_distillation_loss(s, logprobs, indices, target, **kw)
    scalar = loss if loss.dim() == 0 else (loss.double() * row_weights(loss.shape)).sum()
    scalar.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_v_is_the_dense_loss(divergence, tail, dtype, rtol):
    vocab = 37
    s = random_logits(3, 5, vocab, dtype=dtype, seed=1)
    t = random_logits(3, 5, vocab, dtype=dtype, seed=2)
    y = random_target(3, 5, vocab=vocab, ignore_fraction=0.2)
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3, softcap=8.0,
              label_smoothing=0.1, reduction="none")
    logprobs, indices = teacher_topk(t, vocab, 2.0, softcap=8.0, shuffle_seed=3)
    loss, grad = run_sparse(s, logprobs, indices, y, tail=tail, **kw)
    ref_loss, ref_grad, _ = oracle_with_grads(s, t, y, teacher_grad=False, **kw)
    assert_close(loss, ref_loss, rtol, what="loss")
    assert_close(grad, ref_grad, rtol, what="grad")
    assert grad.dtype == dtype


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bucket_is_a_lower_bound_of_dense(divergence, seed):
    vocab = 50
    s = random_logits(16, vocab, dtype=torch.float64, seed=10 + seed)
    t = random_logits(16, vocab, dtype=torch.float64, seed=20 + seed)
    dense = fastkd.distillation_loss(s, t, temperature=1.5, divergence=divergence,
                                     reduction="none")
    for k in (1, 7, vocab - 1):
        logprobs, indices = teacher_topk(t, k, 1.5, shuffle_seed=seed)
        sparse = fastkd.sparse_distillation_loss(s, logprobs, indices, temperature=1.5,
                                                 divergence=divergence, reduction="none")
        assert bool((sparse >= -1e-12).all())
        # 1e-10 relative: the teacher tail 1 - sum p is a float64 difference (k = V - 1).
        assert bool((sparse <= dense * (1 + 1e-10) + 1e-12).all()), (k, (sparse - dense).max())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_float64_formula(divergence, tail, reduction):
    vocab, k = 300, 20
    s = random_logits(2, 9, vocab, seed=4)
    t = random_logits(2, 9, vocab, seed=5)
    y = random_target(2, 9, vocab=vocab, ignore_fraction=0.3)
    logprobs, indices = teacher_topk(t, k, 2.0, shuffle_seed=6)
    kw = dict(tail=tail, temperature=2.0, alpha=0.4, divergence=divergence, beta=0.7,
              label_smoothing=0.05, reduction=reduction)
    loss, grad = run_sparse(s, logprobs, indices, y, **kw)
    ref_loss, ref_grad = sparse_oracle(s, logprobs, indices, y, **kw)
    assert_close(loss, ref_loss, 1e-5, what="loss")
    assert_close(grad, ref_grad, 1e-5, what="grad")
    assert bool((grad[y == -100] == 0).all())


@pytest.mark.parametrize("tail", TAILS)
def test_no_target_float64_num_items_and_stored_fp16_teacher(tail):
    vocab, k = 64, 5
    s = random_logits(12, vocab, dtype=torch.float64, seed=7)
    logprobs, indices = teacher_topk(random_logits(12, vocab, seed=8), k)
    logprobs = logprobs.half()  # stored in low precision, used as given
    kw = dict(tail=tail, divergence="jsd", num_items_in_batch=30, scale_by_t2=False)
    loss, grad = run_sparse(s, logprobs, indices, **kw)
    ref_loss, ref_grad = sparse_oracle(s, logprobs, indices, **kw)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss, 1e-10, what="loss")
    assert_close(grad, ref_grad, 1e-10, what="grad")


def test_bf16_student_close_to_float64_formula():
    vocab, k = 200, 16
    s = random_logits(24, vocab, dtype=torch.bfloat16, seed=9)
    logprobs, indices = teacher_topk(random_logits(24, vocab, seed=10), k)
    loss, grad = run_sparse(s, logprobs, indices, temperature=2.0)
    ref_loss, ref_grad = sparse_oracle(s, logprobs, indices, temperature=2.0)
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-5, what="loss")  # computed in float32 from bf16 inputs
    assert_close(grad, ref_grad, 2.0**-8, what="grad")  # one bf16 rounding


def test_all_ignored_and_padded_student_vocabulary():
    vocab, k = 40, 4
    s = random_logits(6, vocab, seed=11)
    s[:, 30:] = -math.inf  # a student vocabulary padded to the teacher's size
    logprobs, indices = teacher_topk(random_logits(6, vocab, seed=12)[:, :30], k)
    y = torch.full((6,), -100)
    loss, grad = run_sparse(s, logprobs, indices, y)
    assert loss == 0 and bool((grad == 0).all())
    for divergence in DIVERGENCES:
        loss, grad = run_sparse(s, logprobs, indices, divergence=divergence)
        ref_loss, ref_grad = sparse_oracle(s, logprobs, indices, divergence=divergence)
        assert_close(loss, ref_loss, 1e-5, what=divergence)
        assert_close(grad, ref_grad, 1e-5, what=divergence)


def test_no_float32_full_copy_of_bf16_logits(monkeypatch):
    """With the reference's row chunks shrunk to 200 elements (2 rows of V = 100), no float32
    tensor reaches [N, V]; the only [N, V] tensor is the bf16 gradient buffer."""
    monkeypatch.setattr(fastkd.reference.sparse, "CHUNK_ELEMENTS", 200)
    n, vocab = 32, 100
    s = random_logits(n, vocab, dtype=torch.bfloat16, seed=13).requires_grad_(True)
    logprobs, indices = teacher_topk(random_logits(n, vocab, seed=14), 8)
    with LargestTensor(dtype=torch.float32) as float32_mode, LargestTensor() as any_mode:
        fastkd.sparse_distillation_loss(s, logprobs, indices, temperature=2.0,
                                        backend="torch").backward()
    assert any_mode.largest == n * vocab
    assert float32_mode.largest <= 2 * vocab + n * 8, float32_mode.largest


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("tail", TAILS)
def test_fused_linear_variant_equals_materialised_logits(tail, reduction, backend):
    vocab, hidden, k = 90, 12, 9
    g = torch.Generator().manual_seed(15)
    h = torch.randn(2, 13, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (3 / hidden**0.5)
    b = torch.randn(vocab, generator=g)
    y = random_target(2, 13, vocab=vocab, ignore_fraction=0.2)
    logprobs, indices = teacher_topk(random_logits(2, 13, vocab, seed=16), k, 2.0)
    kw = dict(tail=tail, temperature=2.0, alpha=0.3, divergence="reverse_kl", reduction=reduction)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    fused = fastkd.fused_linear_sparse_distillation_loss(
        leaves[0], leaves[1], logprobs, indices, y, student_bias=leaves[2], chunk_size=7,
        backend=backend, **kw)
    ref_leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    logits = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    ref = fastkd.sparse_distillation_loss(logits, logprobs, indices, y, backend="torch", **kw)
    weights = row_weights(fused.shape).float() if reduction == "none" else 1.0
    (fused * weights).sum().backward()
    (ref * weights).sum().backward()
    assert_close(fused.detach(), ref.detach(), 1e-5, what="loss")
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad, 1e-5, what="grad")


def test_module_and_compile_match_functional():
    vocab, k = 30, 6
    s = random_logits(10, vocab, seed=17)
    logprobs, indices = teacher_topk(random_logits(10, vocab, seed=18), k, 2.0)
    y = random_target(10, vocab=vocab, ignore_fraction=0.2)
    crit = fastkd.SparseDistillationLoss(tail="renormalize", temperature=2.0, alpha=0.5)
    expected = fastkd.sparse_distillation_loss(s, logprobs, indices, y, tail="renormalize",
                                               temperature=2.0, alpha=0.5)
    assert_close(crit(s, logprobs, indices, y), expected, 1e-6)
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    student = s.clone().requires_grad_(True)
    loss = compiled(student, logprobs, indices, y)
    loss.backward()
    assert_close(loss.detach(), expected, 1e-6)
    _, ref_grad = sparse_oracle(s, logprobs, indices, y, tail="renormalize", temperature=2.0)
    assert_close(student.grad, ref_grad, 1e-5)


def _sparse_call(**overrides):
    s = random_logits(4, 10, seed=19)
    logprobs, indices = teacher_topk(random_logits(4, 10, seed=20), 3)
    args = dict(student_logits=s, teacher_topk_logprobs=logprobs,
                teacher_topk_indices=indices, target=None)
    args.update(overrides)
    positional = [args.pop(k) for k in ("student_logits", "teacher_topk_logprobs",
                                        "teacher_topk_indices", "target")]
    return fastkd.sparse_distillation_loss(*positional, **args)


@pytest.mark.parametrize("overrides, error, name", [
    (dict(student_logits=torch.ones(4, 10, dtype=torch.int64)), TypeError, "student_logits"),
    (dict(teacher_topk_logprobs=torch.zeros(4, 3, dtype=torch.int64)), TypeError,
     "teacher_topk_logprobs"),
    (dict(teacher_topk_indices=torch.zeros(4, 3)), TypeError, "teacher_topk_indices"),
    (dict(teacher_topk_logprobs=torch.full((5, 3), -3.0)), ValueError, "teacher_topk_logprobs"),
    (dict(teacher_topk_indices=torch.zeros(4, 2, dtype=torch.int64)), ValueError,
     "teacher_topk_indices"),
    (dict(teacher_topk_logprobs=torch.full((4, 11), -3.0),
          teacher_topk_indices=torch.arange(11).repeat(4, 1)), ValueError, "k=11"),
    (dict(teacher_topk_indices=torch.tensor([[0, 1, 10]] * 4)), ValueError,
     "teacher_topk_indices"),
    (dict(teacher_topk_indices=torch.tensor([[0, 1, 1]] * 4)), ValueError, "unique"),
    (dict(teacher_topk_logprobs=torch.full((4, 3), 0.5)), ValueError, "teacher_topk_logprobs"),
    (dict(target=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "target"),
    (dict(tail="drop"), ValueError, "tail"),
    (dict(divergence="js"), ValueError, "divergence"),
    (dict(backend="cuda"), fastkd.BackendUnavailableError, "cuda"),
    (dict(teacher_topk_indices=torch.tensor([[0, 1, 2]] * 4, dtype=torch.int16)), TypeError,
     "teacher_topk_indices"),
    (dict(teacher_temperature=2.0), ValueError, "teacher_temperature"),
    (dict(teacher_temperature=0.0, tail="renormalize"), ValueError, "teacher_temperature"),
    (dict(teacher_topk_logprobs=torch.full((4, 3), float("nan"))), ValueError,
     "teacher_topk_logprobs"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_validation_errors_name_the_argument(overrides, error, name):
    with pytest.raises(error, match=name):
        _sparse_call(**overrides)


def test_mass_check_ignores_ignored_rows():
    """Padding rows of a stored teacher may hold anything; only used rows must be log-probs."""
    s = random_logits(4, 10, seed=21)
    logprobs, indices = teacher_topk(random_logits(4, 10, seed=22), 3)
    logprobs[0] = 0.0  # mass 3: invalid, but the row is ignored
    y = torch.tensor([-100, 1, 2, 3])
    loss = fastkd.sparse_distillation_loss(s, logprobs, indices, y)
    assert bool(torch.isfinite(loss))


def test_stored_teacher_is_a_constant():
    s = random_logits(4, 10, seed=23)
    logprobs, indices = teacher_topk(random_logits(4, 10, seed=24), 3)
    logprobs.requires_grad_(True)
    assert not fastkd.sparse_distillation_loss(s, logprobs, indices).requires_grad
    student = s.clone().requires_grad_(True)
    fastkd.sparse_distillation_loss(student, logprobs, indices).backward()
    assert student.grad is not None and logprobs.grad is None


# --- Backends, re-tempering, garbage in ignored rows, int32 indices, in place, memory ------

BACKENDS = ["cpu", "triton", "torch"]


def _backend_or_skip(backend):
    """Skips (with the reason) when `backend` cannot run CPU tensors here."""
    from fastkd._dispatch import unavailable_reason

    reason = unavailable_reason(backend, torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(reason)
    return backend


def test_auto_picks_the_fused_cpu_kernel():
    from fastkd._dispatch import kernel_for
    from fastkd.ops.sparse_native import sparse_kd_native

    _backend_or_skip("cpu")
    assert kernel_for("topk", "auto", torch.zeros(2, 3)) is sparse_kd_native


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_float64_formula(backend, tail):
    _backend_or_skip(backend)
    vocab, k = 200, 12
    s = random_logits(3, 7, vocab, seed=31)
    y = random_target(3, 7, vocab=vocab, ignore_fraction=0.3)
    logprobs, indices = teacher_topk(random_logits(3, 7, vocab, seed=32), k, 2.0, shuffle_seed=2)
    kw = dict(tail=tail, temperature=2.0, alpha=0.4, divergence="jsd", beta=0.3,
              label_smoothing=0.05)
    loss, grad = run_sparse(s, logprobs, indices, y, backend=backend, **kw)
    ref_loss, ref_grad = sparse_oracle(s, logprobs, indices, y, **kw)
    assert_close(loss, ref_loss, 1e-5, what="loss")
    assert_close(grad, ref_grad, 1e-5, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_temperature_re_tempers_exactly(backend):
    """Log-probs stored at T = 1 distilled at T = 2 (renormalize, k = V) equal the dense loss
    at T = 2 from the teacher's logits."""
    _backend_or_skip(backend)
    vocab = 23
    s, t = random_logits(9, vocab, seed=33), random_logits(9, vocab, seed=34)
    y = random_target(9, vocab=vocab, ignore_fraction=0.2)
    logprobs, indices = teacher_topk(t, vocab, 1.0, shuffle_seed=4)
    for divergence in DIVERGENCES:
        kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, reduction="none")
        loss, grad = run_sparse(s, logprobs, indices, y, tail="renormalize",
                                teacher_temperature=1.0, backend=backend, **kw)
        ref_loss, ref_grad, _ = oracle_with_grads(s, t, y, teacher_grad=False, **kw)
        assert_close(loss, ref_loss, 1e-5, what=f"{divergence} loss")
        assert_close(grad, ref_grad, 1e-5, what=f"{divergence} grad")
    same = fastkd.sparse_distillation_loss(s, logprobs, indices, y, temperature=1.0,
                                           teacher_temperature=1.0, backend=backend)
    assert_close(same, fastkd.sparse_distillation_loss(s, logprobs, indices, y,
                                                       backend=backend), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_may_hold_anything(backend):
    """Padding rows of a stored teacher (zeros, NaN, out-of-range indices) are not read."""
    _backend_or_skip(backend)
    vocab, k = 50, 5
    s = random_logits(6, vocab, seed=35)
    logprobs, indices = teacher_topk(random_logits(6, vocab, seed=36), k)
    y = torch.tensor([3, -100, 7, -100, 9, 11])
    clean = run_sparse(s, logprobs, indices, y, backend=backend)
    garbage_lp, garbage_idx = logprobs.clone(), indices.clone()
    garbage_lp[1], garbage_idx[1] = 0.0, 0  # zero padding: mass 5, repeated index
    garbage_lp[3], garbage_idx[3] = float("nan"), -7
    dirty = run_sparse(s, garbage_lp, garbage_idx.int(), y, backend=backend)
    assert_close(dirty[0], clean[0], 1e-6, what="loss")
    assert_close(dirty[1], clean[1], 1e-6, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_backward_and_strided_rows(backend):
    """inplace_backward writes the gradient into the logits' buffer; a 2-D slice of a wider
    buffer and logits[:, :-1] are read in place; a strided last dimension refuses
    inplace_backward (it needs a copy)."""
    _backend_or_skip(backend)
    vocab, k = 40, 6
    hidden = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(37))
    weight = random_logits(vocab, 16, scale=0.5, seed=38)
    logprobs, indices = teacher_topk(random_logits(2, 8, vocab, seed=39), k, 2.0)
    y = random_target(2, 8, vocab=vocab, ignore_fraction=0.2)
    kw = dict(temperature=2.0, tail="renormalize", backend=backend)
    grads = []
    for inplace in (False, True):
        w = weight.clone().requires_grad_(True)
        logits = hidden @ w.T
        fastkd.sparse_distillation_loss(logits, logprobs, indices, y, inplace_backward=inplace,
                                        **kw).backward()
        grads.append(w.grad)
    assert_close(grads[1], grads[0], 1e-6, what="weight grad")
    wide = random_logits(16, vocab + 9, seed=40).requires_grad_(True)
    flat_lp, flat_idx = logprobs.reshape(16, k), indices.reshape(16, k)
    loss, grad = run_sparse(wide.detach()[:, 2:vocab + 2], flat_lp, flat_idx, y.reshape(16), **kw)
    ref_loss, ref_grad = sparse_oracle(wide.detach()[:, 2:vocab + 2], flat_lp, flat_idx,
                                       y.reshape(16), tail="renormalize", temperature=2.0)
    assert_close(loss, ref_loss, 1e-5, what="strided loss")
    assert_close(grad, ref_grad, 1e-5, what="strided grad")
    # logits[:, :-1] (leading dimensions that do not merge): read and written in place.
    full = random_logits(2, 9, vocab, seed=41)
    ref_loss, ref_grad = sparse_oracle(full[:, :-1], logprobs, indices, y, tail="renormalize",
                                       temperature=2.0)
    leaf = full.clone().requires_grad_(True)
    loss = fastkd.sparse_distillation_loss((leaf * 1.0)[:, :-1], logprobs, indices, y,
                                           inplace_backward=True, **kw)
    loss.backward()
    assert_close(loss.detach(), ref_loss, 1e-5, what="shifted loss")
    assert_close(leaf.grad[:, :-1], ref_grad, 1e-5, what="shifted grad")
    assert bool((leaf.grad[:, -1] == 0).all())
    transposed = random_logits(2, vocab, 8, seed=42).transpose(1, 2)  # strided last dim
    with pytest.raises(ValueError, match="inplace_backward"):
        fastkd.sparse_distillation_loss(transposed, logprobs, indices, y,
                                        inplace_backward=True, **kw)


class _BigStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """The storages of tensors of at least `size` elements that ops produce."""

    def __init__(self, size):
        super().__init__()
        self.size, self.storages = size, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.size:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_kernels_allocate_only_the_gradient(backend):
    _backend_or_skip(backend)
    n, vocab, k = 16, 300, 8
    s = random_logits(n, vocab, seed=42).requires_grad_(True)
    logprobs, indices = teacher_topk(random_logits(n, vocab, seed=43), k)
    y = random_target(n, vocab=vocab, ignore_fraction=0.2)
    with _BigStorages(n * 10) as mode:
        fastkd.sparse_distillation_loss(s, logprobs, indices.int(), y, temperature=2.0,
                                        backend=backend).backward()
    # Besides the logits' own storage: only the (N, V) gradient, scaled in place.
    assert mode.storages - {s.untyped_storage().data_ptr()} == {s.grad.data_ptr()}


def test_module_takes_teacher_temperature():
    vocab, k = 30, 6
    s = random_logits(10, vocab, seed=44)
    logprobs, indices = teacher_topk(random_logits(10, vocab, seed=45), k, 1.0)
    crit = fastkd.SparseDistillationLoss(tail="renormalize", temperature=3.0,
                                         teacher_temperature=1.0)
    expected = fastkd.sparse_distillation_loss(s, logprobs, indices, tail="renormalize",
                                               temperature=3.0, teacher_temperature=1.0)
    assert_close(crit(s, logprobs, indices), expected, 1e-6)
    with pytest.raises(ValueError, match="teacher_temperature"):
        fastkd.SparseDistillationLoss(temperature=3.0, teacher_temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_components_from_the_kernels(backend):
    """(loss, ce, divergence) from the kernels' terms: loss = alpha ce + (1 - alpha) T^2 D."""
    _backend_or_skip(backend)
    vocab, k = 60, 7
    s = random_logits(3, 5, vocab, seed=46)
    y = random_target(3, 5, vocab=vocab, ignore_fraction=0.3)
    logprobs, indices = teacher_topk(random_logits(3, 5, vocab, seed=47), k, 2.0)
    kw = dict(tail="bucket", temperature=2.0, alpha=0.3, divergence="tvd", reduction="none")
    loss, ce, div = fastkd.sparse_distillation_loss(s, logprobs, indices, y, backend=backend,
                                                    return_components=True, **kw)
    ref_ce = fastkd.sparse_distillation_loss(s, logprobs, indices, y, backend="torch",
                                             **dict(kw, alpha=1.0))
    ref_div = fastkd.sparse_distillation_loss(s, logprobs, indices, y, backend="torch",
                                              scale_by_t2=False, **dict(kw, alpha=0.0))
    assert_close(ce, ref_ce, 1e-5, what="ce")
    assert_close(div, ref_div, 1e-5, what="divergence")
    assert_close(loss, 0.3 * ce + 0.7 * 4.0 * div, 1e-5, what="loss")
