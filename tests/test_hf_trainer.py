"""DistillationTrainer: its loss, gradient accumulation, logs and evaluation."""

from __future__ import annotations

import pytest
import torch
from hf_models import batch, collate, examples, gemma2, llama, logits_without_grad, textbook

from fastkd.integrations.transformers import DistillationArguments, DistillationTrainer

KW = dict(temperature=2.0, alpha=0.3)


def arguments(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, logging_steps=1, optim="sgd", learning_rate=0.5,
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, seed=7,
                dataloader_num_workers=0, **KW)
    base.update(kw)
    return DistillationArguments(**base)


def trainer(student, teacher, tmp_path, data=None, **kw):
    return DistillationTrainer(model=student, teacher_model=teacher,
                               args=arguments(tmp_path, **kw), train_dataset=data,
                               eval_dataset=data, data_collator=collate)


def lora_student():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    return peft.get_peft_model(llama(seed=0), config)


STUDENTS = {
    "llama": lambda: (llama(seed=0), llama(hidden=48, layers=2, seed=1)),
    "tied": lambda: (llama(seed=0, tie=True), llama(hidden=48, seed=1)),
    "gemma2-softcap": lambda: (gemma2(seed=0), gemma2(hidden=48, seed=1)),
    "peft-lora": lambda: (lora_student(), llama(hidden=48, seed=1)),
}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_compute_loss_equals_textbook(name, tmp_path):
    student, teacher = STUDENTS[name]()
    tr = trainer(student, teacher, tmp_path)
    assert not tr.teacher_model.training
    assert not any(p.requires_grad for p in tr.teacher_model.parameters())
    b = batch()
    loss = tr.compute_loss(tr.model, b)
    s_logits, t_logits = logits_without_grad(b, student, teacher)
    ref = textbook(s_logits.double(), t_logits.double(), b["labels"], **KW)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    # with the Trainer's item count: sum over this batch / count of the whole step
    n = (b["labels"][:, 1:] != -100).sum() * 3
    loss = tr.compute_loss(tr.model, b, num_items_in_batch=n)
    ref = textbook(s_logits.double(), t_logits.double(), b["labels"], num_items=n, **KW)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def train_one_step(tmp_path, batch_size, accumulation):
    student, teacher = llama(seed=0), llama(hidden=48, seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    # the reference backend: it returns the loss components (ce / kd) on every build
    tr = trainer(student, teacher, tmp_path, data=examples(4), max_steps=1,
                 per_device_train_batch_size=batch_size,
                 gradient_accumulation_steps=accumulation, kd_backend="torch")
    tr.train()
    step = {n: before[n] - p.detach() for n, p in student.named_parameters()}
    logs = [h for h in tr.state.log_history if "loss" in h and "ce" in h]
    return step, logs


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    big, big_logs = train_one_step(tmp_path / "a", 4, 1)
    acc, acc_logs = train_one_step(tmp_path / "b", 2, 2)
    for name in big:
        scale = big[name].abs().max().item()
        assert scale > 0, name
        assert (big[name] - acc[name]).abs().max().item() <= 1e-4 * scale, name
    for logs in (big_logs, acc_logs):
        (log,) = logs
        assert log["loss"] == pytest.approx(0.3 * log["ce"] + 0.7 * 4.0 * log["kd"], rel=1e-4)
    assert acc_logs[0]["loss"] == pytest.approx(big_logs[0]["loss"], rel=1e-5)
    assert acc_logs[0]["kd"] == pytest.approx(big_logs[0]["kd"], rel=1e-5)


def test_evaluate_reports_loss_ce_and_kd(tmp_path):
    tr = trainer(llama(seed=0), llama(hidden=48, seed=1), tmp_path, data=examples(4),
                 per_device_eval_batch_size=2, kd_backend="torch")
    metrics = tr.evaluate()
    assert metrics["eval_loss"] > 0
    assert metrics["eval_loss"] == pytest.approx(
        0.3 * metrics["eval_ce"] + 0.7 * 4.0 * metrics["eval_kd"], rel=1e-4)


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        arguments(tmp_path, alpha=1.5)
    with pytest.raises(ValueError, match="divergence"):
        arguments(tmp_path, divergence="kld")
    with pytest.raises(ValueError, match="lmbda"):
        arguments(tmp_path, lmbda=-0.1)
    with pytest.raises(TypeError, match="DistillationArguments"):
        DistillationTrainer(model=llama(), teacher_model=llama(hidden=48))
    with pytest.raises(ValueError, match="teacher_topk_store"):
        DistillationTrainer(model=llama(), teacher_model=None, args=arguments(tmp_path))


@pytest.fixture
def fresh_accelerate_state(monkeypatch):
    """transformers 4.x records bf16 in the environment (ACCELERATE_MIXED_PRECISION) and
    accelerate in a process-wide singleton: later Trainers of this test process must not
    inherit it."""
    from accelerate.state import AcceleratorState

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # restored afterwards
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_keeps_the_fused_head(tmp_path, fresh_accelerate_state):
    from fastkd.integrations._hf_heads import head_plan

    student, teacher = gemma2(seed=0), gemma2(hidden=48, seed=1)
    tr = trainer(student, teacher, tmp_path, data=examples(4), max_steps=1,
                 per_device_train_batch_size=2, bf16=True)
    tr.train()  # the model's forward runs under CPU autocast (accelerate)
    plan = head_plan(student)
    assert plan.verified and not plan.dense and plan.softcap == 0.5
    b = batch()
    loss = tr.compute_loss(tr.model, b)
    s_logits, t_logits = logits_without_grad(b, student, teacher)
    ref = textbook(s_logits.double(), t_logits.double(), b["labels"], **KW)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=0)
