"""Hugging Face `transformers` integration: a distillation `Trainer` and a plain-loop helper.

    from fastkd.integrations.transformers import (DistillationTrainer, DistillationArguments,
                                                  causal_lm_distillation_loss)

Neither model's [B, T, V] logits are ever stored: the loss runs on the final hidden states
and the output embeddings through `fastkd.fused_linear_distillation_loss` (or, with a stored
top-k teacher, `fastkd.fused_linear_sparse_distillation_loss`). Needs ``pip install fastkd[hf]``
(transformers >= 4.46, tested with 5.x; accelerate; peft for LoRA students). Semantics of the
loss: docs/semantics.md.
"""

from __future__ import annotations

import inspect
import logging
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

try:
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastkd.integrations.transformers needs transformers and accelerate: "
                      "pip install 'fastkd[hf]'") from exc

from .._options import LossOptions
from ._hf_heads import head_plan, unwrap_model
from ._hf_loss import causal_lm_distillation_loss, shift_labels

__all__ = ["DistillationArguments", "DistillationTrainer", "causal_lm_distillation_loss",
           "shift_labels"]

logger = logging.getLogger("fastkd.integrations.transformers")

#: Batch entries passed to both models' forward besides input_ids and attention_mask.
MODEL_INPUTS = ("position_ids", "token_type_ids")


@dataclass
class DistillationArguments(TrainingArguments):
    """`transformers.TrainingArguments` plus the distillation loss and the teacher's source.

    Parameters (beyond TrainingArguments)
    -------------------------------------
    temperature : float > 0, default 1.0. alpha : float in [0, 1], default 0.5 (weight of the
        cross-entropy; the divergence gets 1 - alpha). divergence : "kl" | "reverse_kl" |
        "jsd" | "tvd". beta : float in (0, 1), the JSD mixture. scale_by_t2 : bool.
        label_smoothing : float in [0, 1]. chunk_size : int | None, rows of logits per chunk.
    teacher_topk_store : str | None. Path of a `fastkd.data.TopKStore`: offline teacher
        (pass ``teacher_model=None``). teacher_topk_key_column : str, the dataset column with
        each example's store key. teacher_topk_tail : "bucket" | "renormalize".
    lmbda : float in [0, 1]. Probability that a batch's completions are sampled from the
        student (on-policy, GKD); 0 = the dataset's sequences only. max_new_tokens : int,
        generation_temperature : float > 0, for those samples.
    logits_fallback : "dense" | "raise". A model whose logits are not a plain linear head up
        to a known softcap / logit scale: its full logits (logged) or an error.
    teacher_device : str | None. None: the teacher stays where it is, except that a CPU
        teacher moves to the training device when that is an accelerator.
    kd_backend : fastkd backend ("auto", "cpu", "triton", "cuda", "torch").
    average_tokens_across_devices : bool, default True here on every transformers version
        (so that data parallelism equals one large batch).
    """

    temperature: float = field(default=1.0, metadata={"help": "Distillation temperature T."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the cross-entropy term."})
    divergence: str = field(default="kl", metadata={"help": "kl | reverse_kl | jsd | tvd."})
    beta: float = field(default=0.5, metadata={"help": "JSD mixture weight in (0, 1)."})
    scale_by_t2: bool = field(default=True, metadata={"help": "Multiply the divergence by T^2."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the CE."})
    chunk_size: Optional[int] = field(default=None,
                                      metadata={"help": "Rows of logits per fused chunk."})
    teacher_topk_store: Optional[str] = field(
        default=None, metadata={"help": "Path of a fastkd top-k store (offline teacher)."})
    teacher_topk_key_column: str = field(
        default="key", metadata={"help": "Dataset column holding each example's store key."})
    teacher_topk_tail: str = field(default="bucket",
                                   metadata={"help": "bucket | renormalize (top-k tail)."})
    lmbda: float = field(default=0.0, metadata={"help": "On-policy (student-sampled) fraction."})
    max_new_tokens: int = field(default=128, metadata={"help": "On-policy completion length."})
    generation_temperature: float = field(default=1.0,
                                          metadata={"help": "On-policy sampling temperature."})
    logits_fallback: str = field(default="dense", metadata={"help": "dense | raise."})
    teacher_device: Optional[str] = field(default=None,
                                          metadata={"help": "Device of the teacher."})
    kd_backend: str = field(default="auto", metadata={"help": "fastkd backend."})
    # transformers < 4.50 defaults this to False: each process then divides by its own
    # token count and data parallelism no longer equals one large batch
    average_tokens_across_devices: bool = field(
        default=True, metadata={"help": "Divide the loss by all processes' token count."})

    def __post_init__(self):
        # the loss settings follow the core's one set of rules, not a copy of them
        LossOptions.pick(self.loss_keywords()).validate()
        checks = [
            ("chunk_size", self.chunk_size is None or self.chunk_size >= 1, "None or >= 1"),
            ("teacher_topk_tail", self.teacher_topk_tail in ("bucket", "renormalize"),
             "'bucket' or 'renormalize'"),
            ("lmbda", 0.0 <= self.lmbda <= 1.0, "in [0, 1]"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("generation_temperature", self.generation_temperature > 0, "> 0"),
            ("logits_fallback", self.logits_fallback in ("dense", "raise"),
             "'dense' or 'raise'"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.teacher_topk_store is not None and self.lmbda > 0:
            raise ValueError("lmbda > 0 (on-policy) needs a teacher model, not a "
                             "teacher_topk_store")
        super().__post_init__()

    def loss_keywords(self) -> dict:
        """The keywords of `causal_lm_distillation_loss` these arguments set."""
        return dict(temperature=self.temperature, alpha=self.alpha, divergence=self.divergence,
                    beta=self.beta, scale_by_t2=self.scale_by_t2,
                    label_smoothing=self.label_smoothing, chunk_size=self.chunk_size,
                    backend=self.kd_backend)


class DistillationTrainer(Trainer):
    """`transformers.Trainer` whose loss distils `teacher_model` into `model` (fused lm-head).

    Parameters
    ----------
    model : the student, a transformers causal LM (PEFT/LoRA models included).
    teacher_model : a causal LM with the same tokenizer, or None with
        ``args.teacher_topk_store`` (offline). It is frozen (``requires_grad_(False)``), put
        in eval mode and run under ``torch.no_grad()`` on its own device and dtype.
    args : DistillationArguments.
    teacher_tokenizer : optional; when given it must equal the student's tokenizer.
    **kwargs : everything else `transformers.Trainer` takes (train_dataset, eval_dataset,
        data_collator, processing_class, callbacks, ...). In offline mode, without a
        data_collator, a `fastkd.data.TopKCollator` over the store is used: an example's
        record holds one row per ``input_ids`` token or, for a pre-padded dataset (left,
        right or anywhere, as its ``attention_mask`` says), one row per attended position
        (what ``fastkd cache-teacher`` writes); other row counts raise ``ValueError``.

    The batch holds ``input_ids``, ``attention_mask`` and ``labels`` (unshifted, -100 =
    ignored; ``shift_labels`` is used when present; ``position_ids`` and ``token_type_ids``
    are passed to both models). The loss of a micro-batch is divided by
    the Trainer's ``num_items_in_batch`` (all target tokens of the optimizer step, over all
    processes), so gradient accumulation and data parallelism equal one large batch. Logs
    carry ``loss``, ``ce`` and ``kd`` (the unweighted divergence); evaluation reports
    ``eval_loss``, ``eval_ce`` and ``eval_kd``.
    """

    def __init__(self, model=None, teacher_model=None, args=None, *, teacher_tokenizer=None,
                 **kwargs):
        if not isinstance(args, DistillationArguments):
            raise TypeError("args must be a DistillationArguments, got "
                            f"{type(args).__name__}")
        self.store = None
        if teacher_model is None:
            if args.teacher_topk_store is None:
                raise ValueError("teacher_model is None: set args.teacher_topk_store "
                                 "(offline top-k teacher) or pass a teacher_model")
            from fastkd.data import TopKCollator, TopKStore
            self.store = TopKStore(args.teacher_topk_store)
            if kwargs.get("data_collator") is None:
                tok = kwargs.get("processing_class", kwargs.get("tokenizer"))
                pad = getattr(tok, "pad_token_id", None)
                if pad is None:
                    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
                kwargs["data_collator"] = TopKCollator(
                    self.store, pad_token_id=pad, key_field=args.teacher_topk_key_column)
            if args.remove_unused_columns:
                logger.info("fastkd: remove_unused_columns set to False (the collator needs "
                            "the %r column)", args.teacher_topk_key_column)
                args.remove_unused_columns = False
        elif args.teacher_topk_store is not None:
            raise ValueError("pass either teacher_model or args.teacher_topk_store, not both")
        super().__init__(model=model, args=args, **kwargs)
        # Our loss is normalised by num_items_in_batch: the Trainer must count the items
        # (over labels[..., 1:]) and must not divide the loss by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "_loss_shifts_labels"):
            self._loss_shifts_labels = True
        self.teacher_model = self._prepare_teacher(teacher_model)
        if self.store is not None:
            self._check_store()
        self.teacher_tokenizer = teacher_tokenizer
        self._policy_rng = random.Random(args.seed)
        self._train_terms = None
        self._train_terms_step = 0
        self._eval_terms = None

    # --- teacher -------------------------------------------------------------------------
    def _prepare_teacher(self, teacher):
        if teacher is None:
            return None
        teacher.requires_grad_(False)
        teacher.eval()
        target = self.args.teacher_device
        params = list(teacher.parameters())
        spread = getattr(teacher, "hf_device_map", None)  # placed by accelerate: keep it
        if target is None and not spread and params \
                and all(p.device.type == "cpu" for p in params) \
                and self.args.device.type != "cpu":
            target = self.args.device
        if target is not None:
            teacher.to(target)
        return teacher

    def _student_tokenizer(self):
        return getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)

    # --- loss ----------------------------------------------------------------------------
    def distillation_terms(self, model, inputs, num_items_in_batch=None):
        """The loss of one batch and its two terms, before the data-parallel scaling.

        Parameters
        ----------
        model : the student (possibly wrapped).
        inputs : dict of (B, T) tensors: ``input_ids``, optional ``attention_mask``,
            ``labels``, ``shift_labels``, ``position_ids``; offline also
            ``teacher_topk_logprobs`` (B, T, k) and ``teacher_topk_indices`` (B, T, k).
        num_items_in_batch : int | 0-d tensor | None. Divisor of the summed loss (the
            Trainer's count of target tokens of the optimizer step); None: token mean.

        Returns
        -------
        tuple
            ``(loss, ce, kd)``: float32 scalars; ``ce`` and ``kd`` are detached and
            unweighted.
        """
        keywords = self.args.loss_keywords()
        if num_items_in_batch is not None:
            keywords["num_items_in_batch"] = num_items_in_batch
        extra = {k: inputs[k] for k in MODEL_INPUTS if inputs.get(k) is not None}
        common = dict(labels=inputs.get("labels"), shifted_labels=inputs.get("shift_labels"),
                      model_kwargs=extra,
                      return_components=True, logits_fallback=self.args.logits_fallback,
                      **keywords)
        if self.teacher_model is None:
            return causal_lm_distillation_loss(
                model, None, inputs["input_ids"], inputs.get("attention_mask"),
                teacher_topk_logprobs=inputs["teacher_topk_logprobs"],
                teacher_topk_indices=inputs["teacher_topk_indices"],
                tail=self.args.teacher_topk_tail,
                **self._topk_temperature(), **common)
        tokenizer = self._student_tokenizer()
        return causal_lm_distillation_loss(
            model, self.teacher_model, inputs["input_ids"], inputs.get("attention_mask"),
            student_tokenizer=tokenizer, teacher_tokenizer=self.teacher_tokenizer, **common)

    def _topk_temperature(self) -> dict:
        """{} when the store was written at the distillation temperature, else the stored
        temperature for re-tempering (needs a fastkd with ``teacher_temperature``)."""
        stored = float(self.store.metadata["temperature"])
        if stored == float(self.args.temperature):
            return {}
        if self.args.teacher_topk_tail == "bucket":
            raise ValueError(f"the top-k store was written at temperature {stored} but "
                             f"args.temperature is {self.args.temperature}: re-tempering "
                             "stored log-probabilities needs teacher_topk_tail='renormalize' "
                             "(the tail bucket's mass at another temperature is unknown)")
        import fastkd

        if "teacher_temperature" not in inspect.signature(
                fastkd.fused_linear_sparse_distillation_loss).parameters:
            raise ValueError(f"the top-k store was written at temperature {stored} but "
                             f"args.temperature is {self.args.temperature}: this fastkd "
                             "cannot re-temper stored log-probabilities; use the store's "
                             "temperature")
        return {"teacher_temperature": stored}

    def _check_store(self) -> None:
        """The store's vocabulary against the student's head (its top-k indices are ids)."""
        rows = head_plan(self.model).vocab_size
        stored = int(self.store.metadata["vocab_size"])
        if stored < rows:
            raise ValueError(f"the top-k store's vocabulary has {stored} ids but the "
                             f"student's head has {rows} rows: a different tokenizer?")
        if stored > rows:
            logger.info("fastkd: the top-k store's teacher had %d vocabulary rows, the "
                        "student %d: the extra rows are taken as padding (an index beyond "
                        "the student's vocabulary raises)", stored, rows)
        self._topk_temperature()

    def _dp_scale(self, num_items_in_batch) -> int:
        """Factor undoing DDP's gradient averaging when the loss is divided by the count of
        all processes' tokens (transformers' `average_tokens_across_devices`)."""
        if num_items_in_batch is None or not getattr(self.args, "average_tokens_across_devices",
                                                     False):
            return 1
        return self.accelerator.num_processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss: `distillation_terms`, times the number of processes when it
        is divided by all processes' token count (DDP then averages the gradients).

        Returns
        -------
        torch.Tensor or tuple
            The float32 scalar loss, or ``(loss, {"loss", "ce", "kd"})`` with
            `return_outputs`.
        """
        # the head runs in the mixed precision the model's forward runs in (accelerate wraps
        # only the forward of the prepared model in autocast)
        with self.accelerator.autocast():
            loss, ce, kd = self.distillation_terms(model, inputs, num_items_in_batch)
        scale = self._dp_scale(num_items_in_batch)
        if scale != 1:
            loss = loss * scale
        if model.training:
            # what training_step does to the loss, so the logs match the logged loss
            steps = 1 if num_items_in_batch is not None else \
                self.args.gradient_accumulation_steps
            terms = torch.stack([ce, kd]).float() * (scale / steps)
            self._train_terms = terms if self._train_terms is None else \
                self._train_terms + terms
        return (loss, {"loss": loss, "ce": ce, "kd": kd}) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._train_terms is not None:
            steps = max(1, self.state.global_step - self._train_terms_step)
            terms = self.accelerator.gather(self._train_terms.to(self.args.device)[None])
            terms = terms.reshape(-1, 2).mean(0) / steps
            logs = {**logs, "ce": round(float(terms[0]), 6), "kd": round(float(terms[1]), 6)}
            self._train_terms = None
            self._train_terms_step = self.state.global_step
        return super().log(logs, *args, **kwargs)

    # --- evaluation ----------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The distillation loss of an eval batch (token mean); no logits are returned."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.accelerator.autocast():
            loss, ce, kd = self.distillation_terms(model, inputs)
        n = inputs["input_ids"].shape[0]
        terms = torch.stack([ce * n, kd * n, torch.tensor(float(n), device=ce.device)])
        terms = terms.float().to(self.args.device)
        self._eval_terms = terms if self._eval_terms is None else self._eval_terms + terms
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self._eval_terms = None
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_terms is not None:
            sums = self.accelerator.gather(self._eval_terms[None]).reshape(-1, 3).sum(0)
            output.metrics[f"{prefix}_ce"] = float(sums[0] / sums[2])
            output.metrics[f"{prefix}_kd"] = float(sums[1] / sums[2])
        self._eval_terms = None
        return output

    # --- on-policy (GKD) -----------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        if self.args.lmbda > 0 and self._policy_rng.random() < self.args.lmbda:
            inputs = self.on_policy_inputs(model, inputs)
            num_items_in_batch = None  # the sampled tokens are counted per micro-batch
        return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)

    def on_policy_inputs(self, model, inputs) -> dict:
        """The batch with its completions replaced by samples of the student.

        A sequence's prompt is its tokens before its first target (label != -100 at a
        position >= 1); the student samples up to ``max_new_tokens`` tokens at
        ``generation_temperature`` (full distribution: no top-k / top-p), stopping at its
        EOS.

        Parameters
        ----------
        model : the student as the Trainer holds it (wrappers are removed for `generate`).
        inputs : dict with (B, T) ``input_ids``, ``attention_mask``, ``labels``.

        Returns
        -------
        dict
            Right-padded (B, L) int64 ``input_ids``, ``attention_mask`` and ``labels``
            (-100 on the prompt and padding).
        """
        from ._hf_generate import sample_completions
        return sample_completions(unwrap_model_for_generation(self, model), inputs,
                                  max_new_tokens=self.args.max_new_tokens,
                                  temperature=self.args.generation_temperature,
                                  pad_token_id=self._pad_token_id(model))

    def _pad_token_id(self, model) -> int:
        tok = self._student_tokenizer()
        pad = getattr(tok, "pad_token_id", None)
        config = getattr(unwrap_model(model), "config", None)
        for candidate in (pad, getattr(config, "pad_token_id", None),
                          getattr(config, "eos_token_id", None)):
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0


def unwrap_model_for_generation(trainer: Trainer, model):
    """The model to call `.generate` on: DDP / compile wrappers removed, PEFT kept."""
    return trainer.accelerator.unwrap_model(model)
