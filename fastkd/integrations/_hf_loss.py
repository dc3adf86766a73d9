"""The distillation loss of two Hugging Face causal LMs on one batch, without [B, T, V] logits."""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastkd

from .._options import LossOptions
from ._hf_heads import (
    HeadPlan,
    check_vocabularies,
    final_hidden,
    forward_options,
    head_plan,
    unwrap_model,
    verify_plan,
    warn_once,
)

#: Keywords passed on to fastkd's losses.
#: softcap is not one: it comes from the model's own config.
LOSS_KEYWORDS = (frozenset(LossOptions.names()) - {"softcap"}) | {"chunk_size", "backend"}
#: Extra keywords of the top-k (offline) teacher.
TOPK_KEYWORDS = frozenset({"tail", "teacher_temperature"})


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) -> (B, T): position t's target is labels[:, t + 1]; the last is ignored.

    This is transformers' causal shift, kept at full length so the hidden states need no
    slice: ``F.pad(labels, (0, 1), value=ignore_index)[:, 1:]``.
    """
    return F.pad(labels, (0, 1), value=ignore_index)[:, 1:]


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embeddings' device (models spread over
    devices with a device_map included), else its first parameter's."""
    get = getattr(unwrap_model(model), "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _Side:
    """One model's pass: final hidden states (fused) or its own full logits (dense)."""

    def __init__(self, plan: HeadPlan, hidden=None, logits=None):
        self.plan, self.hidden, self.logits = plan, hidden, logits

    def full_logits(self, rows: Optional[int] = None) -> torch.Tensor:
        if self.logits is not None:
            return self.logits if rows is None else self.logits[..., :rows]
        return self.plan.logits(self.hidden, rows)


def _run(model, input_ids, attention_mask, raise_on_dense: bool, role: str,
         extra: dict) -> _Side:
    plan = head_plan(model)
    name = type(unwrap_model(model)).__name__
    if not plan.dense:
        out = model(input_ids=input_ids, attention_mask=attention_mask, **extra,
                    **forward_options(model, keep_last=True))
        hidden = final_hidden(out)
        decided = plan.verified or verify_plan(model, plan, hidden[:, -1], out.logits[:, -1])
        if decided and not plan.dense:
            return _Side(plan, hidden=hidden)
        del out, hidden
    if plan.dense and raise_on_dense:
        raise ValueError(f"the {role} ({name}) cannot use the fused lm-head loss: "
                         f"{plan.reason}. Pass logits_fallback='dense' to use its full logits")
    if plan.dense:
        warn_once(("dense", role, name),
                  f"fastkd: the {role} ({name}) uses its full [B, T, V] logits (dense "
                  f"fallback, more memory; the loss is the same): {plan.reason}")
    options = forward_options(model, keep_last=False)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **extra, **options)
    return _Side(plan, logits=out.logits)


_TEACHER_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _teacher_head(plan: HeadPlan, rows: int, device):
    """Teacher weight / bias rows [:rows] on the student's device, in their own dtype (the
    losses read each side in its own dtype); copies to another device are cached while the
    weight is unchanged."""
    weight, bias = plan.weight.detach()[:rows], plan.bias
    bias = None if bias is None else bias.detach()[:rows]
    if weight.device == device:
        return weight, bias
    key = (weight.data_ptr(), plan.weight._version, rows, device)
    cached = _TEACHER_HEADS.get(plan.module)
    if cached is None or cached[0] != key:
        moved = (weight.to(device), None if bias is None else bias.to(device))
        cached = (key, moved)
        _TEACHER_HEADS[plan.module] = cached
    return cached[1]


def causal_lm_distillation_loss(student: nn.Module, teacher: Optional[nn.Module],
                                input_ids: torch.Tensor,
                                attention_mask: Optional[torch.Tensor] = None,
                                labels: Optional[torch.Tensor] = None, *,
                                teacher_topk_logprobs: Optional[torch.Tensor] = None,
                                teacher_topk_indices: Optional[torch.Tensor] = None,
                                shifted_labels: Optional[torch.Tensor] = None,
                                return_components: bool = False,
                                logits_fallback: str = "dense",
                                student_tokenizer=None, teacher_tokenizer=None,
                                model_kwargs: Optional[dict] = None,
                                **loss_keywords):
    """Distillation loss of a causal LM `student` from `teacher` on one batch, fused lm-head.

    Runs both models' bodies (the teacher under ``torch.no_grad()`` on its own device, in eval
    mode), takes their final hidden states and output embeddings and calls
    `fastkd.fused_linear_distillation_loss`: no [B, T, V] logits exist. Position t is
    trained on ``labels[:, t + 1]`` (transformers' causal shift); labels equal to
    ``ignore_index`` (-100) are ignored.

    Parameters
    ----------
    student, teacher : transformers causal LMs (``PreTrainedModel``, possibly wrapped by
        PEFT, DDP or torch.compile). ``teacher=None`` with `teacher_topk_*`: offline mode.
    input_ids : (B, T) int64 token ids (same tokenizer for both models).
    attention_mask : (B, T) {0, 1} or None.
    labels : (B, T) int64 or None (then `input_ids` with padding set to -100), unshifted.
    teacher_topk_logprobs, teacher_topk_indices : (B, T, k) float, (B, T, k) int64 or None.
        Offline teacher rows aligned with the shifted targets (row t scores token t + 1), as
        `fastkd.data.TopKCollator` builds them; uses `fastkd.fused_linear_sparse_distillation_loss`.
    shifted_labels : (B, T) int64 or None: the targets already shifted (``shift_labels`` of
        a collator); default ``labels[:, 1:]`` padded with -100.
    return_components : bool. True: ``(loss, ce, divergence)`` (detached, unweighted).
    logits_fallback : "dense" | "raise". A model whose head is not a plain linear layer up to
        a known softcap / logit scale uses its full logits ("dense", logged) or raises.
    student_tokenizer, teacher_tokenizer : optional, to check the vocabularies match.
    model_kwargs : dict or None. More inputs of both models' forward (e.g. ``position_ids``
        of packed sequences), tensors of shape (B, T).
    **loss_keywords : temperature, alpha, divergence, beta, scale_by_t2, ignore_index,
        label_smoothing, reduction, num_items_in_batch, chunk_size, backend (and tail,
        teacher_temperature offline), as in `fastkd.fused_linear_distillation_loss`.
        Softcapping is read from the models' configs (``final_logit_softcapping``), never
        passed.

    Returns
    -------
    torch.Tensor
        Scalar float32 loss (reduction "mean"/"sum"), (B, T) for "none"; a tuple
        ``(loss, ce, divergence)`` with `return_components`.
    """
    allowed = LOSS_KEYWORDS | (TOPK_KEYWORDS if teacher is None else frozenset())
    unknown = sorted(set(loss_keywords) - allowed)
    if "softcap" in loss_keywords:
        raise TypeError("softcap is not a keyword here: it is read from the models' configs "
                        "(final_logit_softcapping)")
    if unknown:
        raise TypeError(f"unknown loss keyword(s) {unknown}; allowed: {sorted(allowed)}")
    if logits_fallback not in ("dense", "raise"):
        raise ValueError(f"logits_fallback must be 'dense' or 'raise', got {logits_fallback!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.is_floating_point():
        raise ValueError("input_ids must be a (B, T) integer tensor")
    for name, t in (("attention_mask", attention_mask), ("labels", labels),
                    ("shifted_labels", shifted_labels)):
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
    offline = teacher_topk_logprobs is not None or teacher_topk_indices is not None
    if teacher is None and not offline:
        raise ValueError("teacher is None: pass teacher_topk_logprobs and "
                         "teacher_topk_indices (offline top-k teacher)")
    if teacher is not None and offline:
        raise ValueError("pass either a teacher model or teacher_topk_* rows, not both")
    ignore_index = loss_keywords.get("ignore_index", -100)
    if shifted_labels is None:
        if labels is None:
            labels = input_ids if attention_mask is None else \
                input_ids.masked_fill(attention_mask == 0, ignore_index)
        shifted_labels = shift_labels(labels, ignore_index)
    raise_on_dense = logits_fallback == "raise"
    extra = dict(model_kwargs or {})
    student_side = _run(student, input_ids, attention_mask, raise_on_dense, "student", extra)
    if offline:
        return _offline_loss(student_side, shifted_labels, teacher_topk_logprobs,
                             teacher_topk_indices, return_components, loss_keywords)
    teacher_side = _teacher_pass(teacher, input_ids, attention_mask, raise_on_dense, extra)
    splan, tplan = student_side.plan, teacher_side.plan
    rows = check_vocabularies(splan, tplan.vocab_size, student_tokenizer=student_tokenizer,
                              teacher_tokenizer=teacher_tokenizer)
    device = (student_side.hidden if student_side.hidden is not None
              else student_side.logits).device
    fused = student_side.hidden is not None and teacher_side.hidden is not None
    if fused and splan.softcap != tplan.softcap:
        warn_once(("caps", splan.softcap, tplan.softcap),
                  f"fastkd: student softcap {splan.softcap} and teacher softcap "
                  f"{tplan.softcap} differ: using dense logits (the loss is the same)")
        fused = False
    if fused:
        return _fused_loss(student_side, teacher_side, rows, device, shifted_labels,
                           return_components, loss_keywords)
    with torch.no_grad():
        t_logits = teacher_side.full_logits(rows).to(device)
    keywords = {k: v for k, v in loss_keywords.items() if k != "chunk_size"}
    return fastkd.distillation_loss(student_side.full_logits(), t_logits, shifted_labels,
                                    return_components=return_components, **keywords)


def _teacher_pass(teacher, input_ids, attention_mask, raise_on_dense, extra) -> _Side:
    if teacher.training:
        warn_once(("teacher-train", id(teacher)),
                  "fastkd: the teacher was in training mode: switched to eval mode",
                  logging.INFO)
        teacher.eval()
    device = _device_of(teacher)
    with torch.no_grad():
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in extra.items()}
        return _run(teacher, input_ids.to(device),
                    None if attention_mask is None else attention_mask.to(device),
                    raise_on_dense, "teacher", extra)


def _scaled(plan: HeadPlan, hidden: torch.Tensor, weight: torch.Tensor, bias):
    """(hidden, bias) with the plan's logit scale folded in; hidden cast to the weight's
    dtype (autocast leaves hidden states in another dtype than the head)."""
    hidden = hidden.to(weight.dtype)
    if plan.scale != 1.0:
        hidden = hidden * plan.scale
        bias = None if bias is None else bias * plan.scale
    return hidden, bias


def _fused_loss(student_side, teacher_side, rows, device, target, return_components,
                keywords):
    splan, tplan = student_side.plan, teacher_side.plan
    s_weight = splan.weight
    s_hidden, s_bias = _scaled(splan, student_side.hidden, s_weight, splan.bias)
    t_weight, t_bias = _teacher_head(tplan, rows, device)
    with torch.no_grad():
        t_hidden = teacher_side.hidden.to(device)
        t_hidden, t_bias = _scaled(tplan, t_hidden, t_weight, t_bias)
    return fastkd.fused_linear_distillation_loss(
        s_hidden, s_weight, t_hidden, t_weight, target.to(device), student_bias=s_bias,
        teacher_bias=t_bias, softcap=splan.softcap, return_components=return_components,
        **keywords)


def _offline_loss(student_side, target, logprobs, indices, return_components, keywords):
    plan = student_side.plan
    if logprobs is None or indices is None:
        raise ValueError("offline mode needs both teacher_topk_logprobs and "
                         "teacher_topk_indices")
    if student_side.hidden is None:
        keywords = {k: v for k, v in keywords.items() if k != "chunk_size"}
        return fastkd.sparse_distillation_loss(student_side.logits, logprobs, indices, target,
                                               return_components=return_components,
                                               **keywords)
    hidden, bias = _scaled(plan, student_side.hidden, plan.weight, plan.bias)
    return fastkd.fused_linear_sparse_distillation_loss(
        hidden, plan.weight, logprobs, indices, target, student_bias=bias,
        softcap=plan.softcap, return_components=return_components, **keywords)
