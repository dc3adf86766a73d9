"""Shared docstring sections of the public losses (functional and modules).

Docstrings hold placeholders such as ``%(options)s``; `fill_doc` substitutes these sections
so every loss documents its keywords the same way.
"""

from __future__ import annotations

SECTIONS = {
    "options": """\
temperature : float, default 1.0
    Softmax temperature T > 0 of the divergence (the CE term is always at temperature 1).
alpha : float, default 0.5
    Weight in [0, 1] of the CE term: ``alpha * CE + (1 - alpha) * k * D``. Unused when
    ``target`` is None (then the loss is ``k * D``).
divergence : {"kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "akl", \
"alpha_beta"}, default "kl"
    D(p_t, p_s): forward KL(p_t || p_s), reverse KL(p_s || p_t), the generalised
    Jensen-Shannon divergence with weight ``beta``, total variation, the skew KL and skew
    reverse KL of DistiLLM (weight ``skew``), the adaptive KL of Wu et al. (head/tail mix of
    forward and reverse KL) or the alpha-beta divergence of ABKD (``alpha_beta``). Exact
    formulas and the backends serving each in docs/semantics.md.
beta : float, default 0.5
    Teacher weight of the JSD mixture, in (0, 1); only used by ``divergence="jsd"``.
skew : float or None, default None
    The skew weight lambda in [0, 1) of "skew_kl" / "skew_reverse_kl" (None: 0.1); passing
    it with another divergence raises ValueError. 0 is exactly "kl" / "reverse_kl".
alpha_beta : (float, float) or None, default None
    (alpha, beta) of ``divergence="alpha_beta"``, both > 0, or exactly (1, 0) (= "kl") or
    (0, 1) (= "reverse_kl"); required by that divergence, refused by the others.
scale_by_t2 : bool, default True
    k = T^2 (Hinton et al.) when True, else k = 1.
ignore_index : int, default -100
    Tokens whose label equals it contribute nothing to either term and get zero gradient.
label_smoothing : float, default 0.0
    Label smoothing in [0, 1] of the CE term (PyTorch's convention).
softcap : float or None, default None
    Logit soft-capping ``c * tanh(z / c)`` applied to both sides before everything else.
reduction : {"mean", "sum", "none"}, default "mean"
    "mean" divides the summed loss by the number of non-ignored tokens (an all-ignored
    batch gives loss 0 and zero gradients), "sum" sums, "none" keeps one value per token.
num_items_in_batch : int, float, tensor or None, default None
    With ``reduction="mean"`` only: divide the summed loss by this instead (gradient
    accumulation, as in transformers). Any other reduction raises ValueError.
backend : {"auto", "triton", "cuda", "cpu", "torch"}, default "auto"
    Which implementation computes the loss. "auto" (or the FASTKD_BACKEND environment
    variable) picks the fastest one that runs the tensors' device and dtypes; float64 on
    either side routes to "torch". A named backend that cannot run them raises
    BackendUnavailableError, never falls back silently.
return_components : bool, default False
    Also return the unweighted CE and divergence, detached and reduced exactly like the
    loss, so that ``loss == alpha * ce + (1 - alpha) * k * divergence`` (``k *
    divergence`` and ``ce == 0`` without a target). The kernels produce them in the same
    pass.""",
    "returns": """\
loss : Tensor
    Scalar, or shape ``(...)`` (the leading dimensions) for ``reduction="none"``; float32
    for fp32/bf16/fp16 inputs (also under ``torch.autocast``), float64 when float64 is
    involved.
ce, divergence : Tensor
    Only with ``return_components=True`` (then a tuple ``(loss, ce, divergence)`` is
    returned): detached, same shape and dtype as ``loss``.""",
    "raises": """\
TypeError
    Non-tensor or integer inputs, float or bool labels (naming ``target``).
ValueError
    Mismatched leading shapes or vocabularies (with how to align them), labels out of
    range that are not ``ignore_index``, bad options (each error names the argument),
    tensors on different devices, ``num_items_in_batch`` with a reduction other than
    "mean".
BackendUnavailableError
    An explicitly named backend that cannot run these tensors (device or dtype).""",
}


def fill_doc(obj):
    """Decorator: replaces ``%(name)s`` placeholders in ``obj.__doc__`` by SECTIONS, each
    line indented like the placeholder."""
    doc = obj.__doc__
    if doc:
        for name, text in SECTIONS.items():
            key = f"%({name})s"
            while key in doc:
                start = doc.index(key)
                indent = doc[doc.rfind("\n", 0, start) + 1:start]
                block = text.replace("\n", "\n" + indent)
                doc = doc[:start] + block + doc[start + len(key):]
        obj.__doc__ = doc
    return obj
