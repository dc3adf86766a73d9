"""The four divergences of issue 22 (skew_kl, skew_reverse_kl, akl, alpha_beta) on the
reference kernel (`fastkd.reference.dense_kd_rows`) against the independent oracle.

Rows and both gradients in float64 (1e-10 relative) and float32 (1e-5, or twice the eager
float32 formula's error where float32 cannot get there), with and without a target, with
ignored rows; the strided / mixed-dtype / terms contract; the limits of docs/semantics.md
(skew 0 is kl / reverse_kl, alpha_beta (1, eps) and (eps, 1) approach kl / reverse_kl, and
(1, 0) / (0, 1) are kl / reverse_kl bit for bit through LossOptions); AKL's head by value.
"""

from __future__ import annotations

import kernel_checks
import pytest
import torch
from kernel_checks import NEW_DIVERGENCE_CASES, NEW_DIVERGENCE_IDS
from oracle import akl_head as oracle_akl_head
from oracle import oracle_loss, random_logits, random_target

import fastkd.reference
from fastkd._options import LossOptions
from fastkd.reference.dense import akl_head

REFERENCE = fastkd.reference.dense_kd_rows


def run(student, teacher, target, **options):
    return kernel_checks.run_raw(REFERENCE, student, teacher, target, **options)


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_float64_matches_oracle(divergence, options, with_target):
    student, teacher, target = kernel_checks.inputs(6, 37, torch.float64, seed=3)
    target = target if with_target else None
    got = run(student, teacher, target, divergence=divergence, **options)
    exact = kernel_checks.oracle_rows(student, teacher, target, divergence=divergence,
                                      **options)
    assert got[0].dtype == torch.float64
    for what, g, e in zip(kernel_checks.OUTPUTS, got, exact):
        kernel_checks.assert_close(g, e, 1e-10, what=what)
    if with_target:
        ignored = target == -100
        assert bool(ignored.any()) and bool((got[0][ignored] == 0).all())
        assert bool((got[1][ignored] == 0).all()) and bool((got[2][ignored] == 0).all())


@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_float32_matches_oracle(divergence, options, temperature):
    student, teacher, target = kernel_checks.inputs(8, 301, torch.float32, seed=5)
    kw = dict(divergence=divergence, temperature=temperature, label_smoothing=0.1, **options)
    got = run(student, teacher, target, **kw)
    exact = kernel_checks.oracle_rows(student, teacher, target, **kw)
    eager = kernel_checks.oracle_rows(student, teacher, target, torch.float32, **kw)
    assert got[0].dtype == torch.float32
    kernel_checks.assert_within_float32(got, exact, eager)


@pytest.mark.parametrize("divergence,options", NEW_DIVERGENCE_CASES, ids=NEW_DIVERGENCE_IDS)
def test_strided_mixed_dtypes_terms(divergence, options):
    student = random_logits(7, 45, dtype=torch.bfloat16, seed=41)
    teacher = random_logits(7, 45, dtype=torch.float32, seed=42)
    target = random_target(7, vocab=45, ignore_fraction=0.3, seed=43)
    kernel_checks.check_layout_dtypes_terms(REFERENCE, student, teacher, target,
                                            temperature=2.0, alpha=0.3, divergence=divergence,
                                            label_smoothing=0.1, **options)


@pytest.mark.parametrize("skewed,plain", [("skew_kl", "kl"), ("skew_reverse_kl", "reverse_kl")])
def test_skew_zero_is_the_plain_kl(skewed, plain):
    student, teacher, target = kernel_checks.inputs(5, 29, torch.float64, seed=8)
    a = run(student, teacher, target, divergence=skewed, skew=0.0)
    b = run(student, teacher, target, divergence=plain)
    for what, x, y in zip(kernel_checks.OUTPUTS, a, b):
        kernel_checks.assert_close(x, y, 1e-12, what=what)
    # and the oracle's own formula agrees at lambda = 0
    d0 = oracle_loss(student, teacher, None, divergence=skewed, skew=0.0, reduction="none")
    d1 = oracle_loss(student, teacher, None, divergence=plain, reduction="none")
    kernel_checks.assert_close(d0, d1, 1e-12)


@pytest.mark.parametrize("pair,plain", [((1.0, 1e-4), "kl"), ((1e-4, 1.0), "reverse_kl")])
def test_alpha_beta_formula_approaches_its_limits(pair, plain):
    """The AB formula itself (not the (1, 0) shortcut) near its limits, float64."""
    student, teacher, target = kernel_checks.inputs(5, 29, torch.float64, seed=9)
    near = run(student, teacher, target, divergence="alpha_beta", alpha_beta=pair)
    limit = run(student, teacher, target, divergence=plain)
    for what, x, y in zip(kernel_checks.OUTPUTS, near, limit):
        kernel_checks.assert_close(x, y, 1e-3, what=what)
    kernel_checks.assert_close(
        oracle_loss(student, teacher, None, divergence="alpha_beta", alpha_beta=pair,
                    reduction="none"),
        oracle_loss(student, teacher, None, divergence=plain, reduction="none"), 1e-3)


@pytest.mark.parametrize("pair,plain", [((1, 0), "kl"), ((0.0, 1.0), "reverse_kl")])
def test_alpha_beta_exact_limits_are_the_kl_codes(pair, plain):
    options = LossOptions(divergence="alpha_beta", alpha_beta=pair, temperature=2.0).validate()
    args = options.kernel_args(True)
    assert args.divergence == fastkd.reference.DIVERGENCES.index(plain)
    plain_args = LossOptions(divergence=plain, temperature=2.0).validate().kernel_args(True)
    student, teacher, target = kernel_checks.inputs(4, 33, torch.float32, seed=10)
    outputs = []
    for a in (args, plain_args):
        gs, gt = torch.empty_like(student), torch.empty_like(teacher)
        outputs.append((REFERENCE(student, teacher, target, gs, gt, None, a), gs, gt))
    for x, y in zip(*outputs):
        assert torch.equal(x, y)


def test_kernel_args_of_the_new_divergences():
    """LossOptions gives the codes 4..7 and their parameters (skew's default 0.1)."""
    expected = {("skew_kl", None): (4, 0.1, 0.0), ("skew_reverse_kl", 0.3): (5, 0.3, 0.0),
                ("akl", None): (6, 0.0, 0.0)}
    for (name, skew), (code, a, b) in expected.items():
        args = LossOptions(divergence=name, skew=skew).validate().kernel_args(False)
        assert (args.divergence, args.param_a, args.param_b) == (code, a, b)
    args = LossOptions(divergence="alpha_beta", alpha_beta=(0.5, 0.2)).validate().kernel_args(
        False)
    assert (args.divergence, args.param_a, args.param_b) == (7, 0.5, 0.2)


@pytest.mark.parametrize("p,head", [
    ([0.3, 0.3, 0.2, 0.2], [1, 1, 0, 0]),     # ties at the threshold: both in
    ([0.5, 0.25, 0.25], [1, 0, 0]),           # exactly mu
    ([0.2, 0.4, 0.2, 0.2], [1, 1, 1, 1]),     # the tie below the top is all in
    ([0.05, 0.1, 0.85], [0, 0, 1]),
])
def test_akl_head_by_value(p, head):
    p = torch.tensor([p], dtype=torch.float64)
    expected = torch.tensor([head], dtype=torch.bool)
    assert torch.equal(akl_head(p), expected)
    assert torch.equal(oracle_akl_head(p), expected)


def test_akl_weights_move_with_the_gap():
    """AKL is between FKL and RKL: the head-heavy gap gives mostly FKL, the tail-heavy mostly
    RKL (a check that the weights are not constant)."""
    student, teacher, _ = kernel_checks.inputs(16, 50, torch.float64, seed=12)
    kw = dict(temperature=2.0, reduction="none")
    akl = oracle_loss(student, teacher, None, divergence="akl", **kw)
    fkl = oracle_loss(student, teacher, None, divergence="kl", **kw)
    rkl = oracle_loss(student, teacher, None, divergence="reverse_kl", **kw)
    low, high = torch.minimum(fkl, rkl), torch.maximum(fkl, rkl)
    assert bool(((akl >= low - 1e-12) & (akl <= high + 1e-12)).all())
    assert not torch.allclose(akl, fkl) and not torch.allclose(akl, rkl)
    got = run(student, teacher, None, divergence="akl", grad_teacher=False)[0]
    kernel_checks.assert_close(got, akl, 1e-10)


def test_bad_code_raises():
    student, teacher, target = kernel_checks.inputs(2, 5, torch.float32)
    args = kernel_checks.VALID_ARGS._replace(divergence=8)
    with pytest.raises(ValueError, match="divergence code"):
        REFERENCE(student, teacher, target, None, None, None, args)
