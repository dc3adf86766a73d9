"""How a Hugging Face causal LM turns its final hidden states into logits.

A plan per model: the output-embedding weight and bias (`get_output_embeddings()` of the
unwrapped model, so PEFT/LoRA, DDP, torch.compile wrappers and tied embeddings are handled),
and the logit transform the model applies after it, `cap(scale * (h @ W.T + b))`. The
transform is read from the config (softcapping, logit scales) and *verified* once per model
against the logits the model itself returns for the last position of a real batch. When no
candidate reproduces the model's logits, or the head is not a plain `nn.Linear` (LoRA or a
quantised layer on the head), the plan says "dense": the caller then uses the model's own full
logits. Only public transformers / PEFT / torch APIs are used.
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("fastkd.integrations.transformers")

#: Config attributes holding a factor on the logits; `logits_scaling` divides (Granite) or
#: multiplies (HyperCLOVA X) depending on the architecture: both are tried by the probe.
_SCALE_ATTRIBUTES = ("logit_scale", "lm_head_multiplier", "output_multiplier", "logits_scaling")
_DIVIDING_ATTRIBUTES = ("logits_scaling",)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/FSDP (`.module`), torch.compile (`._orig_mod`) and
    PEFT (`.get_base_model()`) wrappers; LoRA layers stay injected in the returned model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module"):
            model = model.module
    return model


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        return config.get_text_config()
    return config


@dataclass
class HeadPlan:
    """weight (V, H) and bias (V,) | None of the head; logits = cap(scale * (h @ W.T + b))."""

    module: nn.Module
    scale: float = 1.0
    softcap: Optional[float] = None
    dense: bool = False
    verified: bool = False
    reason: str = ""

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.module, "bias", None)

    @property
    def vocab_size(self) -> int:
        return self.module.weight.shape[0]

    def logits(self, hidden: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """cap(scale * (hidden @ W[:rows].T + b[:rows])), float32 when a transform applies."""
        weight, bias = self.weight, self.bias
        if rows is not None:
            weight = weight[:rows]
            bias = None if bias is None else bias[:rows]
        out = F.linear(hidden.to(weight.dtype), weight, bias)
        if self.scale != 1.0 or self.softcap:
            out = out.float()
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out


_PLANS: weakref.WeakKeyDictionary[nn.Module, HeadPlan] = weakref.WeakKeyDictionary()
_WARNED: set = set()
_SAME_TOKENIZERS: set = set()


def warn_once(key, message: str, level: int = logging.WARNING) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.log(level, message)


def _candidates(model: nn.Module) -> list:
    """(scale, softcap) pairs the config suggests, the plain head first."""
    config = text_config(model)
    cap = getattr(config, "final_logit_softcapping", None)
    caps = [float(cap), None] if isinstance(cap, (int, float)) and cap else [None]
    scales = [1.0]
    for name in _SCALE_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value:
            continue
        scales.append(float(value))
        if name in _DIVIDING_ATTRIBUTES:
            scales.append(1.0 / float(value))
    out = []
    for c in caps:
        for s in dict.fromkeys(scales):
            out.append((s, c))
    return out


def head_plan(model: nn.Module) -> HeadPlan:
    """The (cached) plan of `model`'s head; `verified` is False until `verify_plan` ran."""
    inner = unwrap_model(model)
    plan = _PLANS.get(inner)
    if plan is not None:
        return plan
    get = getattr(inner, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if module is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings "
                         "(get_output_embeddings() is None): not a causal language model?")
    plan = HeadPlan(module=module)
    if not (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        plan.dense, plan.verified = True, True
        plan.reason = (f"its output layer is a {type(module).__name__} (e.g. LoRA or a "
                       "quantised layer on the head), not a plain nn.Linear")
    _PLANS[inner] = plan
    return plan


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else \
            torch.is_autocast_enabled()


def verify_plan(model: nn.Module, plan: HeadPlan, hidden_last: torch.Tensor,
                logits_last: torch.Tensor) -> bool:
    """Finds the transform reproducing the model's own logits at one position per sequence.

    hidden_last (B, H) final hidden states, logits_last (B, V) the model's logits for them.
    Returns False when undecided (all-zero logits): the caller then uses dense logits for this
    call and the check runs again next time. Host synchronisation: once per model.
    """
    with torch.no_grad():
        y = logits_last.float()
        z = F.linear(hidden_last.to(plan.weight.dtype), plan.weight, plan.bias).float()
        wide = (torch.float32, torch.float64)
        exact = plan.weight.dtype in wide and logits_last.dtype in wide \
            and not _autocast(logits_last.device.type)
        rtol = 1e-4 if exact else 3e-2  # bf16 / fp16 heads (or autocast) round to ~1e-2
        bound = rtol * float(y.abs().max()) + 1e-6
        matches = []
        for scale, cap in _candidates(model):
            pred = z * scale
            if cap:
                pred = cap * torch.tanh(pred / cap)
            err = float((y - pred).abs().max())
            if math.isfinite(err) and err <= bound:
                matches.append((scale, cap, err))
    name = type(unwrap_model(model)).__name__
    if not matches:
        plan.dense, plan.verified = True, True
        plan.reason = ("its logits are not cap(scale * (hidden @ W.T + b)) for any softcap or "
                       "logit scale of its config (an unknown logit transform)")
        return True
    distinct = {(round(s, 12), c) for s, c, _ in matches}
    if len(distinct) > 1 and float(y.abs().max()) < 1e-6:
        return False
    scale, cap, _ = min(matches, key=lambda m: m[2])
    plan.scale, plan.softcap, plan.verified = scale, cap, True
    if scale != 1.0 or cap:
        warn_once(("transform", name, scale, cap),
                  f"fastkd: {name} logits = softcap {cap} of {scale} * lm_head(hidden) "
                  "(verified against the model's own logits); the fused loss applies it.",
                  logging.INFO)
    return True


def forward_options(model: nn.Module, keep_last: bool) -> dict:
    """Keywords for `model(...)`: hidden states, no KV cache, and (keep_last) logits of the
    last position only (`logits_to_keep`, `num_logits_to_keep` on transformers < 4.50)."""
    inner = unwrap_model(model)
    params = inspect.signature(inner.forward).parameters
    options = {"output_hidden_states": keep_last, "return_dict": True}
    if "use_cache" in params:
        options["use_cache"] = False
    if keep_last:
        if "logits_to_keep" in params:
            options["logits_to_keep"] = 1
        elif "num_logits_to_keep" in params:
            options["num_logits_to_keep"] = 1
        else:
            warn_once(("no-keep", type(inner).__name__),
                      f"fastkd: {type(inner).__name__}.forward has no logits_to_keep: the "
                      "model computes its full logits anyway (the loss itself stays fused)")
    return options


def final_hidden(output) -> torch.Tensor:
    """The last entry of `hidden_states` of a model output (the input of the lm-head)."""
    states = getattr(output, "hidden_states", None)
    if states is None and isinstance(output, dict):
        states = output.get("hidden_states")
    if not states:
        raise ValueError("the model returned no hidden_states with output_hidden_states=True")
    return states[-1]


def check_vocabularies(student_plan: HeadPlan, teacher_vocab: int, *,
                       student_tokenizer=None, teacher_tokenizer=None) -> int:
    """Number of teacher head rows to use (= the student's vocabulary size).

    A teacher head with extra rows is sliced to the student's vocabulary when those rows are
    padding (no token of the tokenizer lands there); different tokenizers raise.
    """
    vs = student_plan.vocab_size
    pair = (id(student_tokenizer), id(teacher_tokenizer))
    if student_tokenizer is not None and teacher_tokenizer is not None \
            and pair not in _SAME_TOKENIZERS:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ValueError("the student's and the teacher's tokenizers differ (different "
                             "token-to-id maps): logit distillation needs one tokenizer")
        _SAME_TOKENIZERS.add(pair)
    tokenizer = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    used = len(tokenizer) if tokenizer is not None else None
    if teacher_vocab < vs:
        raise ValueError(f"the teacher's head has {teacher_vocab} rows but the student's has "
                         f"{vs}: the student has ids the teacher cannot score (a different "
                         "tokenizer, or a padded student head: use one tokenizer and a student "
                         "head no larger than the teacher's)")
    if used is not None and used > vs:
        raise ValueError(f"the tokenizer has {used} tokens but the student's head only {vs} "
                         "rows: the vocabularies do not match")
    if teacher_vocab > vs:
        warn_once(("slice", id(student_plan), teacher_vocab, vs),
                  f"fastkd: the teacher's head has {teacher_vocab} rows, the student's {vs}: "
                  f"teacher rows {vs}..{teacher_vocab - 1} are padding of its head and are "
                  f"dropped (logits sliced to the student's {vs})"
                  + ("" if used is None else f"; the tokenizer has {used} tokens"),
                  logging.INFO)
    return vs
