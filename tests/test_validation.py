"""Bad input (docs/semantics.md §8): each raises ValueError / TypeError naming the argument.

Valid counterparts of each case are checked too, so a test cannot pass by the library
rejecting everything.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import random_logits, random_target

import fastkd

N, V = 6, 11


def good_inputs():
    student = random_logits(2, 3, V, seed=1)
    teacher = random_logits(2, 3, V, seed=2)
    target = random_target(2, 3, vocab=V, ignore_fraction=0.3, seed=1)
    return student, teacher, target


def call(student=None, teacher=None, target="default", **kw):
    s, t, y = good_inputs()
    student = s if student is None else student
    teacher = t if teacher is None else teacher
    target = y if isinstance(target, str) else target
    return fastkd.distillation_loss(student, teacher, target, backend="torch", **kw)


def raises(exc, argument):
    """pytest.raises for `exc` whose message names `argument` as a whole word."""
    return pytest.raises(exc, match=rf"\b{argument}\b")


def test_valid_inputs_pass():
    assert torch.isfinite(call())


@pytest.mark.parametrize("teacher_shape", [(2, 4, V), (6, V), (2, 3, 1, V), (3, 2, V + 1)],
                         ids=["tokens", "flattened", "rank", "tokens-and-vocab"])
def test_mismatched_leading_shapes(teacher_shape):
    """Leading shapes that differ get their own message (not the vocabulary's)."""
    with raises(ValueError, "teacher_logits") as info:
        call(teacher=random_logits(*teacher_shape, seed=2))
    message = str(info.value)
    assert "leading shape" in message and str(tuple(teacher_shape[:-1])) in message
    assert "vocabulary" not in message


@pytest.mark.parametrize("extra", [1, 64, -3], ids=["teacher+1", "teacher+64", "student+3"])
def test_mismatched_vocabularies_say_how_to_align(extra):
    """The advice is to slice off padding columns (or that the tokenizers must match), never
    to pad with -inf (which makes the loss inf)."""
    with raises(ValueError, "teacher_logits") as info:
        call(teacher=random_logits(2, 3, V + extra, seed=2))
    message = str(info.value)
    assert "-inf" not in message and "pad the" not in message
    assert "tokenizer" in message
    if extra > 0:
        assert f"teacher_logits[..., :{V}]" in message
    else:
        assert f"student_logits[..., :{V + extra}]" in message
    # Following the advice works.
    teacher = random_logits(2, 3, V + 64, seed=2)
    assert torch.isfinite(call(teacher=teacher[..., :V]))


@pytest.mark.parametrize("name", ["student_logits", "teacher_logits"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_logits(name, dtype):
    bad = torch.ones(2, 3, V, dtype=dtype)
    with raises(TypeError, name):
        call(**{name.split("_")[0]: bad})


@pytest.mark.parametrize("name", ["student_logits", "teacher_logits"])
def test_logits_not_a_tensor(name):
    with raises(TypeError, name):
        call(**{name.split("_")[0]: [[0.0] * V]})


def test_scalar_logits():
    with raises(ValueError, "student_logits"):
        fastkd.distillation_loss(torch.tensor(1.0), torch.tensor(2.0), backend="torch")


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16),
                                    (torch.float32, torch.float64)], ids=str)
def test_mixed_logit_dtypes_are_accepted(dtypes):
    student, teacher, target = good_inputs()
    loss = call(student.to(dtypes[0]), teacher.to(dtypes[1]), target)
    wide = torch.float64 in dtypes
    assert loss.dtype == (torch.float64 if wide else torch.float32)
    same_values = call(student.to(dtypes[0]).double(), teacher.to(dtypes[1]).double(), target)
    torch.testing.assert_close(loss.double(), same_values, rtol=1e-5 if not wide else 1e-12,
                               atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool])
def test_float_or_bool_target(dtype):
    _, _, target = good_inputs()
    with raises(TypeError, "target"):
        call(target=target.to(dtype))


def test_target_not_a_tensor():
    with raises(TypeError, "target"):
        call(target=[[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("shape", [(6,), (2, 4), (2, 3, 1)])
def test_target_shape_mismatch(shape):
    with raises(ValueError, "target"):
        call(target=torch.zeros(shape, dtype=torch.int64))


@pytest.mark.parametrize("label", [V, V + 5, -1, -99, -101])
def test_label_out_of_range(label):
    _, _, target = good_inputs()
    target[1, 2] = label
    with raises(ValueError, "target") as info:
        call(target=target)
    assert str(label) in str(info.value)


def test_ignore_index_labels_and_custom_ignore_index():
    """-100 is fine by default; with ignore_index=-1, -1 is fine and -100 is out of range."""
    _, _, target = good_inputs()
    target[0, 0] = -100
    call(target=target)
    target[0, 1] = -1
    with raises(ValueError, "target"):
        call(target=target)
    target[target == -100] = 3
    call(target=target, ignore_index=-1)
    target[0, 0] = -100
    with raises(ValueError, "target"):
        call(target=target, ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.uint8], ids=str)
def test_any_integer_target_dtype(dtype):
    """Labels of every integer dtype give the int64 result (uint8 has no -100: none ignored;
    int8 labels with a custom ignore_index)."""
    _, _, target = good_inputs()
    if dtype == torch.uint8:
        target = target.clamp(min=0)
    expected = call(target=target)
    torch.testing.assert_close(call(target=target.to(dtype)), expected, rtol=0, atol=0)
    if dtype != torch.uint8:
        custom = torch.where(target == -100, -1, target)
        torch.testing.assert_close(call(target=custom.to(dtype), ignore_index=-1), expected,
                                   rtol=0, atol=0)
    with raises(ValueError, "target"):
        bad = target.clone()
        bad[0, 0] = V
        call(target=bad.to(dtype))


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, "2", None, True])
def test_temperature(value):
    with raises(ValueError, "temperature"):
        call(temperature=value)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, None])
def test_alpha(value):
    with raises(ValueError, "alpha"):
        call(alpha=value)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.5, 2.0, math.nan])
def test_beta_for_jsd(value):
    with raises(ValueError, "beta"):
        call(divergence="jsd", beta=value)
    call(divergence="kl", beta=value)  # beta is unused (and unchecked) by the other losses


@pytest.mark.parametrize("keyword,value", [("divergence", "js"), ("divergence", "KL"),
                                           ("divergence", None), ("reduction", "avg"),
                                           ("reduction", None), ("backend", "gpu"),
                                           ("backend", None)])
def test_unknown_names(keyword, value):
    with raises(ValueError, keyword):
        fastkd.distillation_loss(*good_inputs(), **{keyword: value})


@pytest.mark.parametrize("moved", ["teacher_logits", "target"])
def test_different_devices(moved):
    """The meta device stands in for a second device (no GPU needed)."""
    student, teacher, target = good_inputs()
    if moved == "teacher_logits":
        teacher = teacher.to("meta")
    else:
        target = target.to("meta")
    with raises(ValueError, moved):
        call(student, teacher, target)


@pytest.mark.parametrize("value", [0.0, -5.0, math.nan, "5"])
def test_softcap(value):
    with raises(ValueError, "softcap"):
        call(softcap=value)


@pytest.mark.parametrize("value", [-0.1, 1.1, math.nan])
def test_label_smoothing(value):
    with raises(ValueError, "label_smoothing"):
        call(label_smoothing=value)


@pytest.mark.parametrize("value", [0, -3, 0.0, math.nan, "8"])
def test_num_items_in_batch(value):
    with raises(ValueError, "num_items_in_batch"):
        call(num_items_in_batch=value)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_num_items_in_batch_needs_mean(reduction):
    with raises(ValueError, "num_items_in_batch") as info:
        call(num_items_in_batch=7, reduction=reduction)
    assert reduction in str(info.value)
    with raises(ValueError, "num_items_in_batch"):
        fastkd.DistillationLoss(reduction=reduction, backend="torch")(
            *good_inputs(), num_items_in_batch=torch.tensor(7))
    call(num_items_in_batch=7, reduction="mean")


@pytest.mark.parametrize("value", [1.5, "x", None])
def test_ignore_index(value):
    with raises(TypeError, "ignore_index"):
        call(ignore_index=value)


@pytest.mark.parametrize("keyword,value", [("temperature", 0.0), ("alpha", 2.0),
                                           ("divergence", "js"), ("reduction", "avg"),
                                           ("softcap", -1.0), ("label_smoothing", 2.0),
                                           ("backend", "gpu")])
def test_module_constructor_validates(keyword, value):
    with raises(ValueError, keyword):
        fastkd.DistillationLoss(**{keyword: value})


def test_module_constructor_validates_jsd_beta():
    with raises(ValueError, "beta"):
        fastkd.DistillationLoss(divergence="jsd", beta=1.0)


def test_module_forward_validates():
    crit = fastkd.DistillationLoss(backend="torch")
    student, teacher, target = good_inputs()
    with raises(ValueError, "num_items_in_batch"):
        crit(student, teacher, target, num_items_in_batch=0)
    with raises(TypeError, "target"):
        crit(student, teacher, target.float())
