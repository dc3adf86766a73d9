"""DistillationTrainer's on-policy (GKD) and offline (top-k store) modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import VOCAB, collate, examples, llama, logits_without_grad, textbook
from test_hf_trainer import KW, arguments, trainer

from fastkd.integrations.transformers import DistillationTrainer


def test_on_policy_loss_is_the_dense_formula_on_sampled_sequences(tmp_path):
    student, teacher = llama(seed=0), llama(hidden=48, seed=1)
    tr = trainer(student, teacher, tmp_path, data=examples(4), lmbda=1.0, max_new_tokens=6,
                 generation_temperature=0.8, per_device_train_batch_size=2, max_steps=2)
    b = collate(examples(3))
    torch.manual_seed(0)
    sampled = tr.on_policy_inputs(tr.model, b)
    ids, labels, mask = sampled["input_ids"], sampled["labels"], sampled["attention_mask"]
    for i in range(3):
        prompt = (b["labels"][i, 1:] != -100).nonzero()[0].item() + 1
        n = int(mask[i].sum())
        assert torch.equal(ids[i, :prompt], b["input_ids"][i, :prompt])  # prompt kept
        assert (labels[i, :prompt] == -100).all() and (labels[i, n:] == -100).all()
        completion = labels[i, prompt:n]
        assert 1 <= completion.numel() <= 6 and torch.equal(completion, ids[i, prompt:n])
        assert (completion[:-1] != 2).all()  # stops at the first EOS
    loss = tr.compute_loss(tr.model, sampled)
    with torch.no_grad():
        t_logits = teacher(ids, attention_mask=mask).logits
        s_logits = student(ids, attention_mask=mask).logits
    ref = textbook(s_logits.double(), t_logits.double(), labels, **KW)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    # training with lmbda=1 samples every batch, and runs
    calls = []
    sample = tr.on_policy_inputs
    tr.on_policy_inputs = lambda model, inputs: calls.append(1) or sample(model, inputs)
    before = student.lm_head.weight.detach().clone()
    tr.train()
    assert len(calls) == 2
    assert not torch.equal(before, student.lm_head.weight)


def topk_rows(teacher, ids, k, temperature):
    """(L, k) log-probabilities at T and indices of one sequence's teacher logits."""
    with torch.no_grad():
        logits = teacher(torch.tensor([ids])).logits[0].double()
    lp = F.log_softmax(logits / temperature, -1)
    values, indices = lp.topk(k, -1)
    return values.float(), indices


@pytest.fixture
def data_module():
    return pytest.importorskip("fastkd.data", reason="fastkd.data (top-k store, issue 12) "
                               "not merged into this branch yet")


def write_store(data, path, teacher, exs, k):
    with data.TopKWriter(str(path), k=k, vocab_size=VOCAB, temperature=2.0,
                         value_dtype=torch.float32) as writer:
        for ex in exs:
            writer.append(ex["key"], *topk_rows(teacher, ex["input_ids"], k, 2.0))


def test_offline_store_with_k_equal_v_equals_online_dense(tmp_path, data_module):
    student, teacher = llama(seed=0), llama(hidden=48, seed=1)
    exs = examples(4)
    write_store(data_module, tmp_path / "store", teacher, exs, VOCAB)
    tr = DistillationTrainer(model=student, teacher_model=None,
                             args=arguments(tmp_path, teacher_topk_store=str(tmp_path / "store"),
                                            max_steps=1, per_device_train_batch_size=2),
                             train_dataset=exs)
    b = tr.data_collator(exs[:3])
    loss = tr.compute_loss(tr.model, b)
    s_logits, t_logits = logits_without_grad(b, student, teacher)
    ref = textbook(s_logits.double(), t_logits.double(), b["labels"], **KW)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    before = student.lm_head.weight.detach().clone()
    tr.train()  # the key column reaches the collator
    assert not torch.equal(before, student.lm_head.weight)


def test_offline_store_top8_equals_sparse_loss_on_full_logits(tmp_path, data_module):
    import fastkd

    student, teacher = llama(seed=0), llama(hidden=48, seed=1)
    exs = examples(3)
    write_store(data_module, tmp_path / "store", teacher, exs, 8)
    tr = DistillationTrainer(model=student, teacher_model=None,
                             args=arguments(tmp_path, teacher_topk_store=str(tmp_path / "store"),
                                            teacher_topk_tail="renormalize"))
    b = tr.data_collator(exs)
    loss = tr.compute_loss(tr.model, b)
    s_logits, = logits_without_grad(b, student)
    ref = fastkd.sparse_distillation_loss(
        s_logits.double(), b["teacher_topk_logprobs"].double(), b["teacher_topk_indices"],
        b["shift_labels"], tail="renormalize", backend="torch", **KW)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_offline_store_checks(tmp_path, data_module):
    teacher = llama(hidden=48, seed=1)
    exs = examples(2)
    write_store(data_module, tmp_path / "store", teacher, exs, 4)
    store = str(tmp_path / "store")
    with pytest.raises(ValueError, match="student's head has"):
        DistillationTrainer(model=llama(vocab=VOCAB + 3), teacher_model=None,
                            args=arguments(tmp_path, teacher_topk_store=store))
    with pytest.raises(ValueError, match="not both"):
        DistillationTrainer(model=llama(), teacher_model=teacher,
                            args=arguments(tmp_path, teacher_topk_store=store))
    with pytest.raises(ValueError, match="on-policy"):
        arguments(tmp_path, teacher_topk_store=store, lmbda=0.5)


def test_offline_store_at_another_temperature_is_re_tempered(tmp_path, data_module):
    import fastkd

    student, teacher = llama(seed=0), llama(hidden=48, seed=1)
    exs = examples(3)
    with data_module.TopKWriter(str(tmp_path / "store"), k=8, vocab_size=VOCAB,
                                temperature=1.0, value_dtype=torch.float32) as writer:
        for ex in exs:
            writer.append(ex["key"], *topk_rows(teacher, ex["input_ids"], 8, 1.0))
    tr = DistillationTrainer(model=student, teacher_model=None,
                             args=arguments(tmp_path, teacher_topk_store=str(tmp_path / "store"),
                                            teacher_topk_tail="renormalize"))  # T = 2
    b = tr.data_collator(exs)
    loss = tr.compute_loss(tr.model, b)
    s_logits, = logits_without_grad(b, student)
    # the stored T=1 top-8 re-tempered to T=2 is the teacher's T=2 distribution over them
    lp8, idx8 = b["teacher_topk_logprobs"], b["teacher_topk_indices"]
    tempered = lp8.double() / 2.0
    tempered = tempered - tempered.logsumexp(-1, keepdim=True)
    ref = fastkd.sparse_distillation_loss(s_logits.double(), tempered, idx8,
                                          b["shift_labels"], tail="renormalize",
                                          backend="torch", **KW)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="bucket"):
        DistillationTrainer(model=student, teacher_model=None,
                            args=arguments(tmp_path, teacher_topk_store=str(tmp_path / "store")))


def pad_example(ex, width, side):
    """`ex` left- or right-padded to `width` (pad id 0, label -100, attention 0)."""
    pad = width - len(ex["input_ids"])
    def fill(values, filler):
        return [filler] * pad + values if side == "left" else values + [filler] * pad
    return {"key": ex["key"], "input_ids": fill(ex["input_ids"], 0),
            "labels": fill(ex["labels"], -100),
            "attention_mask": fill([1] * len(ex["input_ids"]), 0)}


def loss_and_grads(tr, b, num_items):
    tr.model.zero_grad()
    loss = tr.compute_loss(tr.model, b, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters()}


@pytest.mark.parametrize("side", ["left", "right"])
def test_offline_pre_padded_dataset_equals_the_collator_padded_one(tmp_path, data_module,
                                                                    side):
    student, teacher = llama(seed=0), llama(hidden=48, seed=1)
    exs = examples(4, seed=11)  # 6 to 12 tokens, masked prompts of 1 to 3 tokens
    write_store(data_module, tmp_path / "store", teacher, exs, 8)  # one row per token
    tr = DistillationTrainer(model=student, teacher_model=None,
                             args=arguments(tmp_path, teacher_topk_store=str(tmp_path / "store"),
                                            teacher_topk_tail="renormalize", max_steps=1,
                                            per_device_train_batch_size=4))
    ref_batch = tr.data_collator(exs)
    padded = tr.data_collator([pad_example(ex, 16, side) for ex in exs])
    assert padded["input_ids"].shape == (4, 16)
    count = int((ref_batch["shift_labels"] != -100).sum())
    assert int((padded["shift_labels"] != -100).sum()) == count
    ref_loss, ref_grads = loss_and_grads(tr, ref_batch, count)
    loss, grads = loss_and_grads(tr, padded, count)
    # left padding shifts every RoPE position by the same amount: equal up to rounding
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max())
    # and the Trainer trains on the pre-padded dataset
    tr.train_dataset = [pad_example(ex, 16, side) for ex in exs]
    before = student.lm_head.weight.detach().clone()
    tr.train()
    assert not torch.equal(before, student.lm_head.weight)


def test_offline_row_count_mismatch_raises(tmp_path, data_module):
    exs = examples(2)
    write_store(data_module, tmp_path / "store", llama(hidden=48, seed=1), exs, 4)
    tr = DistillationTrainer(model=llama(), teacher_model=None,
                             args=arguments(tmp_path, teacher_topk_store=str(tmp_path / "store")))
    bad = pad_example(exs[1], 16, "left")
    bad["attention_mask"][-1] = 0  # one attended position fewer than the stored rows
    n = len(exs[1]["input_ids"])
    with pytest.raises(ValueError, match=f"'ex1' has {n} top-k rows in the store but 16 "
                                         f"input_ids and {n - 1} attended positions"):
        tr.data_collator([bad])
