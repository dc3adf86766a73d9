"""causal_lm_distillation_loss: equal to the textbook loss on the models' full logits."""

from __future__ import annotations

import logging

import pytest
import torch
from hf_models import (
    VOCAB,
    batch,
    full_logits,
    gemma2,
    llama,
    textbook,
    tiny_config_model,
    transformers,
)

from fastkd.integrations.transformers import causal_lm_distillation_loss

KW = dict(temperature=2.0, alpha=0.3)


def check_value_and_grads(student, teacher, b, rtol=1e-5, **kw):
    """Fused loss == textbook on float64 logits; student gradients == textbook's (fp32)."""
    kw = {**KW, **kw}
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = causal_lm_distillation_loss(student, teacher, **b, **kw)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.no_grad():
        t_logits = full_logits(teacher, b)
    s_logits = full_logits(student, b)
    ref64 = textbook(s_logits.double(), t_logits.double(), b["labels"], **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref64, rtol=rtol, atol=0)
    textbook(s_logits, t_logits, b["labels"], **kw).backward()
    for p, g in zip(params, grads):
        scale = p.grad.abs().max().item()
        assert scale > 0
        assert (g - p.grad).abs().max().item() <= 1e-4 * scale + 1e-8
    return loss


def test_llama_student():
    check_value_and_grads(llama(seed=0), llama(hidden=48, layers=2, seed=1), batch())


def test_tied_embedding_student():
    student = llama(seed=0, tie=True)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    check_value_and_grads(student, llama(hidden=48, seed=1), batch())


def test_softcapped_gemma2_student_and_teacher():
    b = batch()
    s, t = gemma2(seed=0), gemma2(hidden=48, seed=1)
    # the cap bites: logits beyond it are squashed
    assert full_logits(s, b).abs().max() > 0.4
    check_value_and_grads(s, t, b)
    check_value_and_grads(s, t, b, divergence="jsd", alpha=0.0)


def test_different_softcaps_use_dense_logits(caplog):
    with caplog.at_level(logging.WARNING, logger="fastkd.integrations.transformers"):
        check_value_and_grads(gemma2(seed=0, softcap=0.6), llama(hidden=48, seed=1), batch())
    assert "softcap" in caplog.text


def test_peft_lora_student():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    student = peft.get_peft_model(llama(seed=0), config)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    check_value_and_grads(student, llama(hidden=48, seed=1), batch())


def test_cohere_logit_scale():
    student = tiny_config_model("Cohere", logit_scale=0.25)
    check_value_and_grads(student, llama(hidden=48, seed=1), batch())


class ScaledLlama(transformers.LlamaForCausalLM):
    """A head fastkd cannot know: logits * 1.7 + 0.1 with nothing in the config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.7 + 0.1
        return out


def test_unknown_logit_transform_falls_back_or_raises(caplog):
    torch.manual_seed(0)
    config = llama(seed=0).config
    student = ScaledLlama(config).eval()
    teacher = llama(hidden=48, seed=1)
    with pytest.raises(ValueError, match="unknown logit transform"):
        causal_lm_distillation_loss(student, teacher, **batch(), logits_fallback="raise")
    with caplog.at_level(logging.WARNING, logger="fastkd.integrations.transformers"):
        check_value_and_grads(student, teacher, batch())
    assert "dense fallback" in caplog.text


def test_padded_teacher_head_is_sliced(caplog):
    student, teacher = llama(seed=0), llama(hidden=48, seed=1, vocab=VOCAB + 31)
    b = batch()
    with caplog.at_level(logging.INFO, logger="fastkd.integrations.transformers"):
        check_value_and_grads(student, teacher, b)
    assert f"{VOCAB}..{VOCAB + 30}" in caplog.text


def test_vocabulary_errors():
    b = batch()
    with pytest.raises(ValueError, match="teacher's head has"):
        causal_lm_distillation_loss(llama(vocab=VOCAB + 5), llama(hidden=48), **b)

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    a = Tok({f"t{i}": i for i in range(90)})
    z = Tok({f"u{i}": i for i in range(90)})
    with pytest.raises(ValueError, match="tokenizers differ"):
        causal_lm_distillation_loss(llama(), llama(hidden=48), **b, student_tokenizer=a,
                                    teacher_tokenizer=z)
    big = Tok({f"t{i}": i for i in range(VOCAB + 3)})
    with pytest.raises(ValueError, match="tokenizer has"):
        causal_lm_distillation_loss(llama(), llama(hidden=48, vocab=VOCAB + 8), **b,
                                    student_tokenizer=big, teacher_tokenizer=big)


def test_keyword_errors_and_components():
    s, t, b = llama(), llama(hidden=48), batch()
    with pytest.raises(TypeError, match="softcap"):
        causal_lm_distillation_loss(s, t, **b, softcap=3.0)
    with pytest.raises(TypeError, match="unknown loss keyword"):
        causal_lm_distillation_loss(s, t, **b, temprature=2.0)
    with pytest.raises(ValueError, match="teacher_topk"):
        causal_lm_distillation_loss(s, None, **b)
    loss, ce, kd = causal_lm_distillation_loss(s, t, **b, return_components=True,
                                               backend="torch", **KW)
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * 4.0 * kd, rtol=1e-5, atol=0)


def test_teacher_in_training_mode_is_run_in_eval_mode():
    s, t, b = llama(), llama(hidden=48, seed=1, attention_dropout=0.5), batch()
    t.train()
    with torch.no_grad():  # in training mode dropout changes the teacher's logits
        assert not torch.equal(full_logits(t, b), full_logits(t, b))
    first = causal_lm_distillation_loss(s, t, **b)
    assert not t.training
    assert causal_lm_distillation_loss(s, t, **b) == first


def test_bf16_teacher_fp32_student():
    s, t, b = llama(seed=0), llama(hidden=48, seed=1).to(torch.bfloat16), batch()
    loss = causal_lm_distillation_loss(s, t, **b, **KW)
    loss.backward()
    assert loss.dtype == torch.float32 and s.lm_head.weight.grad is not None
    with torch.no_grad():
        t_logits = full_logits(t, b).double()
        ref = textbook(full_logits(s, b).double(), t_logits, b["labels"], **KW)
    # the teacher's bf16 hidden states and head give its logits up to bf16 rounding
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=0)


def test_granite_logits_scaling_divides():
    student = tiny_config_model("Granite", logits_scaling=4.0)
    check_value_and_grads(student, llama(hidden=48, seed=1), batch())
    from fastkd.integrations._hf_heads import head_plan

    assert head_plan(student).scale == 0.25 and not head_plan(student).dense


def test_position_ids_reach_both_models():
    s, t, b = llama(seed=0), llama(hidden=48, seed=1), batch(b=2, t=9)
    b["attention_mask"] = torch.ones_like(b["attention_mask"])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)  # two packed sequences per row
    loss = causal_lm_distillation_loss(s, t, **b, model_kwargs={"position_ids": pos}, **KW)
    with torch.no_grad():
        s_logits = s(b["input_ids"], position_ids=pos).logits.double()
        t_logits = t(b["input_ids"], position_ids=pos).logits.double()
    ref = textbook(s_logits, t_logits, b["labels"], **KW)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    assert abs(causal_lm_distillation_loss(s, t, **b, **KW).item() - ref.item()) > 1e-4


def test_lora_on_the_head_uses_dense_logits(caplog):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                             init_lora_weights=False)
    student = peft.get_peft_model(llama(seed=0), config)
    with caplog.at_level(logging.WARNING, logger="fastkd.integrations.transformers"):
        check_value_and_grads(student, llama(hidden=48, seed=1), batch())
    assert "not a plain nn.Linear" in caplog.text
    with pytest.raises(ValueError, match="fused lm-head"):
        causal_lm_distillation_loss(student, llama(hidden=48), **batch(),
                                    logits_fallback="raise")
