"""The loss settings: one frozen, validated value per call, and the kernel scalars from it.

Every public loss keeps its keywords; inside, they travel as one `LossOptions` (the top-k
losses: `TopKOptions`), checked once by `validate` with one set of rules (the same
`ValueError` / `TypeError` on every backend). The public keyword lists are generated from the
fields (`takes_options`), so a new divergence parameter is added here, as a field with its
default and its rule, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import ClassVar, Optional

import torch

from ._kernel_args import KernelArgs
from .reference import DIVERGENCES
from .reference.sparse import TAILS

REDUCTIONS = ("mean", "sum", "none")
#: The divergences that take `skew` (the mixing weight of the skewed distribution).
SKEW_DIVERGENCES = ("skew_kl", "skew_reverse_kl")
#: `skew` when a skew divergence is asked for without one (DistiLLM's default, Ko et al. 2024).
DEFAULT_SKEW = 0.1


def _is_finite_number(x) -> bool:
    # bool is an int in Python, but True as a temperature is a caller's mistake
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_num_items(num_items_in_batch) -> None:
    """None, a tensor (checked by the reduction, without a host sync) or a number > 0."""
    if num_items_in_batch is None or isinstance(num_items_in_batch, torch.Tensor):
        return
    if not _is_finite_number(num_items_in_batch) or not num_items_in_batch > 0:
        raise ValueError("num_items_in_batch must be None, a tensor or a number > 0, "
                         f"got {num_items_in_batch!r}")


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The settings of `alpha * CE + (1 - alpha) * k * D` (docs/semantics.md), one per field.

    Built from the public keywords (`LossOptions(**keywords).validate()`); the kernels get
    their scalars from `kernel_args`, computed once here.
    """

    _names: ClassVar[tuple] = ()  # the field names, set once below the class

    temperature: float = 1.0
    alpha: float = 0.5
    divergence: str = "kl"
    beta: float = 0.5
    skew: Optional[float] = None
    alpha_beta: Optional[tuple] = None
    scale_by_t2: bool = True
    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    reduction: str = "mean"
    num_items_in_batch: object = None

    @classmethod
    def names(cls) -> tuple:
        """The keyword names, in field order: the one list every entry point shares."""
        return cls._names  # a constant: torch.compile cannot trace dataclasses.fields

    def keywords(self) -> dict:
        """The options as the public keywords (to call another public loss with them)."""
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def pick(cls, keywords: dict) -> LossOptions:
        """The options among `keywords` (others are ignored), unvalidated."""
        return cls(**{k: keywords[k] for k in cls.names() if k in keywords})

    def validate(self) -> LossOptions:
        """Raises ValueError / TypeError naming the first bad option; returns self."""
        self._check_temperature_alpha()
        self._check_divergence()
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if (not _is_finite_number(self.label_smoothing)
                or not 0.0 <= self.label_smoothing <= 1.0):
            raise ValueError("label_smoothing must be a number in [0, 1], got "
                             f"{self.label_smoothing!r}")
        if self.softcap is not None and (not _is_finite_number(self.softcap)
                                         or not self.softcap > 0):
            raise ValueError(f"softcap must be None or a number > 0, got {self.softcap!r}")
        self._check_reduction()
        return self

    def _check_temperature_alpha(self) -> None:
        # inf would make every probability uniform and the T^2 weight inf (NaN losses)
        if not _is_finite_number(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature must be a finite number > 0, got "
                             f"{self.temperature!r}")
        if not _is_finite_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")

    def _check_divergence(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got "
                             f"{self.divergence!r}")
        if self.divergence == "jsd" and (not _is_finite_number(self.beta)
                                         or not 0.0 < self.beta < 1.0):
            raise ValueError("beta must be a number in (0, 1) for divergence='jsd', got "
                             f"{self.beta!r}")
        self._check_skew()
        self._check_alpha_beta()

    def _check_skew(self) -> None:
        if self.skew is None:
            return
        if self.divergence not in SKEW_DIVERGENCES:
            raise ValueError(f"skew is used only by divergence in {SKEW_DIVERGENCES}, got "
                             f"skew={self.skew!r} with divergence={self.divergence!r} (drop "
                             "skew, or choose a skew divergence)")
        if not _is_finite_number(self.skew) or not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must be a number in [0, 1), got {self.skew!r}")

    def _check_alpha_beta(self) -> None:
        if self.alpha_beta is None:
            if self.divergence == "alpha_beta":
                raise ValueError("divergence='alpha_beta' needs alpha_beta=(a, b), e.g. "
                                 "alpha_beta=(0.5, 0.5)")
            return
        if self.divergence != "alpha_beta":
            raise ValueError("alpha_beta is used only by divergence='alpha_beta', got "
                             f"alpha_beta={self.alpha_beta!r} with divergence="
                             f"{self.divergence!r}")
        pair = self.alpha_beta
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(_is_finite_number(x) for x in pair)):
            raise ValueError(f"alpha_beta must be a pair (a, b) of finite numbers, got {pair!r}")
        a, b = float(pair[0]), float(pair[1])
        if (a, b) in ((1.0, 0.0), (0.0, 1.0)):
            return  # the limits: forward KL and reverse KL, computed exactly as those
        if not (a > 0 and b > 0):
            raise ValueError("alpha_beta=(a, b) needs a > 0 and b > 0 (or exactly (1, 0), the "
                             f"forward KL, or (0, 1), the reverse KL), got {pair!r}")

    def _check_reduction(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        check_num_items(self.num_items_in_batch)
        if self.num_items_in_batch is not None and self.reduction != "mean":
            raise ValueError("num_items_in_batch divides the summed loss, so it needs "
                             f"reduction='mean'; got reduction={self.reduction!r} (pass "
                             "num_items_in_batch=None, or reduction='mean')")

    def loss_weights(self, target_given: bool) -> tuple:
        """(ce_weight, div_weight): alpha and (1 - alpha) * k, k = T^2 or 1; with no target
        there is no hard term and the loss is `k * D` (alpha unused)."""
        k = float(self.temperature) ** 2 if self.scale_by_t2 else 1.0
        if not target_given:
            return 0.0, k
        return float(self.alpha), (1.0 - float(self.alpha)) * k

    @property
    def divergence_params(self) -> tuple:
        """(param_a, param_b), the kernels' two divergence parameters: jsd (beta, 0);
        skew_kl / skew_reverse_kl (skew, 0); alpha_beta (a, b); others (0, 0)."""
        if self.divergence == "jsd":
            return float(self.beta), 0.0
        if self.divergence in SKEW_DIVERGENCES:
            return float(DEFAULT_SKEW if self.skew is None else self.skew), 0.0
        if self.divergence == "alpha_beta":
            return float(self.alpha_beta[0]), float(self.alpha_beta[1])
        return 0.0, 0.0

    @property
    def divergence_code(self) -> int:
        """The kernels' integer for `divergence` (its index in `DIVERGENCES`); alpha_beta's
        limits (1, 0) and (0, 1) are kl's and reverse_kl's codes (the kernels see only
        a, b > 0)."""
        if self.divergence == "alpha_beta":
            limit = {(1.0, 0.0): "kl", (0.0, 1.0): "reverse_kl"}.get(
                tuple(float(x) for x in self.alpha_beta))
            if limit is not None:
                return DIVERGENCES.index(limit)
        return DIVERGENCES.index(self.divergence)

    def kernel_args(self, target_given: bool, weight: Optional[float] = None) -> KernelArgs:
        """The kernels' scalars (`fastkd._kernel_args.KernelArgs`). `weight`: a reduction
        factor folded into both loss weights (None: 1)."""
        ce_weight, div_weight = self.loss_weights(target_given)
        param_a, param_b = self.divergence_params
        softcap = float(self.softcap) if self.softcap is not None else 0.0
        return KernelArgs(float(self.temperature), ce_weight, div_weight, self.divergence_code,
                          param_a, param_b, int(self.ignore_index),
                          float(self.label_smoothing), softcap).weighted(weight)


LossOptions._names = tuple(f.name for f in dataclasses.fields(LossOptions))


@dataclasses.dataclass(frozen=True)
class TopKOptions(LossOptions):
    """`LossOptions` of the top-k (offline) teacher losses: also how the teacher's missing
    mass is treated (`tail`) and the temperature its log-probs were stored at."""

    tail: str = "bucket"
    teacher_temperature: Optional[float] = None

    def validate(self) -> TopKOptions:
        super().validate()
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        teacher_scale(self.teacher_temperature, self.temperature, self.tail)
        return self

    def kernel_args(self, target_given: bool, weight: Optional[float] = None) -> KernelArgs:
        """`LossOptions.kernel_args` with the tail and the re-tempering factor."""
        return super().kernel_args(target_given, weight)._replace(
            renormalize=self.tail == "renormalize",
            teacher_scale=teacher_scale(self.teacher_temperature, self.temperature, self.tail))


TopKOptions._names = tuple(f.name for f in dataclasses.fields(TopKOptions))


def takes_options(options_type: type = LossOptions):
    """Decorator of a public loss written ``fn(tensors..., *, options, other keywords)``.

    The public function takes one keyword-only argument per field of `options_type` (the
    field's default), where ``options`` stood in `fn`'s signature (`inspect.signature` and
    help() show them); a call's option keywords are gathered into one validated
    `options_type` value passed as ``options``. An unknown keyword raises TypeError.
    """
    names = options_type.names()
    fields = {f.name: f for f in dataclasses.fields(options_type)}

    def decorate(fn):
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index("options")
        option_params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                           default=fields[name].default)
                         for name in names]

        @functools.wraps(fn)
        def public(*args, **keywords):
            values = {name: keywords.pop(name) for name in names if name in keywords}
            return fn(*args, options=options_type(**values).validate(), **keywords)

        public.__signature__ = signature.replace(
            parameters=params[:at] + option_params + params[at + 1:])
        del public.__wrapped__  # help() and inspect show the public signature, not fn's
        return public

    return decorate


def teacher_scale(teacher_temperature, temperature: float, tail: str) -> float:
    """T_stored / T: the factor that re-tempers stored top-k log-probs (1 when not
    re-tempered)."""
    if teacher_temperature is None:
        return 1.0
    if not _is_finite_number(teacher_temperature) or teacher_temperature <= 0:
        raise ValueError("teacher_temperature must be None or a finite number > 0, got "
                         f"{teacher_temperature!r}")
    scale = float(teacher_temperature) / float(temperature)
    if scale != 1.0 and tail == "bucket":
        raise ValueError(f"teacher_temperature={teacher_temperature} differs from "
                         f"temperature={temperature}: re-tempering needs tail='renormalize' "
                         "(the bucket's tail mass at the new temperature is unknown)")
    return scale
