"""End to end: distil a small transformers Llama teacher into a smaller student with
FusedLinearDistillationLoss (examples/distil_llama.py), on CPU, nothing downloaded.

Asserts that the fused loss equals the loss on materialised logits for real hidden states,
that the distillation loss falls, and that the loss head's peak memory (resident-set growth,
see `peak_rss_growth` in the example) is far below the naive path that materialises logits.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import fastkd

pytest.importorskip("transformers", reason="transformers is not installed (make test "
                    "installs it); the end-to-end Llama test needs it")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distil_llama.py"


def load_example():
    spec = importlib.util.spec_from_file_location("distil_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained():
    example = load_example()
    teacher, student = example.build_models(vocab=2048, seed=0)
    teacher_losses = example.train_teacher(teacher, steps=20)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return example, teacher, student, teacher_losses


def test_fused_loss_equals_materialised_logits_on_model_hidden_states(trained):
    example, teacher, student, _ = trained
    ids = example.synthetic_batch(4, 24, torch.Generator().manual_seed(3))
    s_hidden, t_hidden, labels = example.head_inputs(student, teacher, ids)
    w_s, w_t = student.lm_head.weight, teacher.lm_head.weight
    fused = fastkd.fused_linear_distillation_loss(s_hidden, w_s, t_hidden, w_t, labels,
                                                  temperature=2.0, chunk_size=10)
    (fused_grad,) = torch.autograd.grad(fused, w_s)
    dense = fastkd.distillation_loss(s_hidden @ w_s.T, t_hidden @ w_t.T, labels,
                                     temperature=2.0)
    (dense_grad,) = torch.autograd.grad(dense, w_s)
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, dense_grad, rtol=1e-4, atol=1e-7)


def test_distillation_loss_falls_and_memory_is_below_naive(trained):
    example, teacher, student, teacher_losses = trained
    assert teacher_losses[-1] < 0.8 * teacher_losses[0], teacher_losses
    criterion = fastkd.FusedLinearDistillationLoss(temperature=2.0, alpha=0.5, chunk_size=64)
    losses = example.distil(student, teacher, steps=15, criterion=criterion)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses

    ids = example.synthetic_batch(16, 64, torch.Generator().manual_seed(5))
    try:
        mem = example.head_peak_memory(student, teacher, ids, criterion)
    except OSError as exc:  # no /proc or glibc: the measurement is Linux-only
        pytest.skip(f"peak resident-memory measurement unavailable here: {exc}")
    # 1008 tokens x 2048 vocabulary: one float32 logits tensor is 7.9 MiB; the naive path
    # holds several, the fused one a 64-row chunk of each plus the weight gradient.
    assert mem["fused"] < mem["logits_bytes"], mem
    assert mem["fused"] * 4 < mem["naive"], mem
