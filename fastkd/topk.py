"""Top-k teacher log-probabilities without materialising the full `[tokens x vocab]` logits.

`topk_teacher_logprobs(h, W, k)` computes, for every row of `h`, the `k` largest entries of

    log_softmax(cap(h @ W.T + b) / T)          cap(z) = c * tanh(z / c) if softcap=c else z

and their vocabulary indices, sorted in descending order. The values are the exact log-softmax
at temperature T: the log-sum-exp runs over the FULL vocabulary, so `exp(values).sum(-1) <= 1`
and the missing mass is the teacher's tail. These are the tensors that
`fastkd.sparse_distillation_loss` and `fastkd.data.TopKWriter` take.

How it runs (peak memory). The rows are processed `chunk_size` at a time and, inside a row
chunk, the vocabulary in column blocks of at most `VOCAB_BLOCK` columns. For each block the
float32 logits `(rows, cols)` are formed, folded into a running log-sum-exp (max + rescaled sum)
and merged into a running top-k (`torch.topk` over the `k` kept entries and the new block). So
the only vocabulary-sized temporaries are one block of float32 logits (`rows * cols * 4` bytes,
about twice that while merging) and, for bf16/fp16 weights, the float32 copy of one block of
`W` (`cols * H * 4` bytes; `cols` is then reduced so that this copy also stays within the chunk
budget: 64 MiB on CPU, 512 MiB on CUDA). Nothing of size `N * V` is ever allocated, and with
`chunk_size=None` the peak extra memory is about three chunk budgets whatever N and V are.
All arithmetic is in float32 whatever the input dtypes (fp32/bf16/fp16, which may differ
between hidden, weight and bias); float64 inputs are computed in float64 and the result is
returned as float32.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional, Tuple

import torch

__all__ = ["topk_teacher_logprobs", "topk_teacher_logprobs_from_logits", "VOCAB_BLOCK"]

#: largest number of vocabulary columns whose logits exist at once (per row chunk)
VOCAB_BLOCK = 32768
#: default byte budget of one chunk of float32 logits (rows * block * 4)
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or "
                        f"float64), got {x.dtype}")


def _check_options(k, temperature, softcap, chunk_size, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= vocab:
        raise ValueError(f"k must satisfy 1 <= k <= vocabulary size {vocab}, got {k}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be None or a float, got {type(softcap).__name__}")
        if not (math.isfinite(float(softcap)) and float(softcap) > 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be None or an int, got {type(chunk_size).__name__}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be None or >= 1 rows, got {chunk_size}")


def _default_rows(device: torch.device, cols: int) -> int:
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * max(1, cols)))


class _RunningTopK:
    """Online log-sum-exp and top-k over vocabulary blocks of one row chunk."""

    def __init__(self, k: int):
        self.k = k
        self.values: Optional[torch.Tensor] = None  # (rows, <=k) scaled logits
        self.indices: Optional[torch.Tensor] = None  # (rows, <=k) int64
        self.max: Optional[torch.Tensor] = None  # (rows, 1)
        self.sum: Optional[torch.Tensor] = None  # (rows, 1) sum exp(z - max)

    def update(self, z: torch.Tensor, col0: int) -> None:
        """Fold the scaled logits `z` (rows, cols) of columns `col0 .. col0+cols` in."""
        block_max = z.amax(dim=-1, keepdim=True)
        if self.max is None:
            new_max = block_max
        else:
            new_max = torch.maximum(self.max, block_max)
        # A row whose logits are all -inf so far keeps max -inf: shift by 0 instead (no NaN).
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        block_sum = torch.exp(z - shift).sum(dim=-1, keepdim=True)
        if self.sum is None:
            self.sum = block_sum
        else:
            self.sum = self.sum * torch.exp(self.max - shift) + block_sum
        self.max = new_max
        cols = z.shape[-1]
        take = min(self.k, cols)
        vals, idx = torch.topk(z, take, dim=-1, sorted=False)
        idx = idx + col0
        if self.values is not None:
            vals = torch.cat([self.values, vals], dim=-1)
            idx = torch.cat([self.indices, idx], dim=-1)
            take = min(self.k, vals.shape[-1])
            vals, pos = torch.topk(vals, take, dim=-1, sorted=False)
            idx = torch.gather(idx, -1, pos)
        self.values, self.indices = vals, idx

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        lse = self.max + torch.log(self.sum)
        vals, order = torch.sort(self.values, dim=-1, descending=True)
        return vals - lse, torch.gather(self.indices, -1, order)


def _scaled(z: torch.Tensor, temperature: float, softcap: Optional[float]) -> torch.Tensor:
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature != 1.0:
        z = z / temperature
    return z


def _no_autocast(device: torch.device):
    """Keep the float32 matmul float32 inside a caller's `torch.autocast` region."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(*tensors) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


@torch.no_grad()
def topk_teacher_logprobs(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    k: int,
    *,
    teacher_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher log-probabilities at `temperature`, through the lm-head chunk by chunk.

    Parameters
    ----------
    teacher_hidden : Tensor (..., H), float32 / bfloat16 / float16 / float64
        The teacher's final hidden states (after its last norm), e.g. `(B, L, H)`.
    teacher_weight : Tensor (V, H), floating
        The lm-head weight, laid out as in `nn.Linear` (any floating dtype).
    k : int
        Number of entries kept per row, `1 <= k <= V`.
    teacher_bias : Tensor (V,) or None
        The lm-head bias, if any.
    temperature : float
        Distillation temperature T > 0: values are `log_softmax(cap(z) / T)`.
    softcap : float or None
        Final-logit soft-capping `c * tanh(z / c)` applied before dividing by T
        (e.g. Gemma-2's `final_logit_softcapping`).
    chunk_size : int or None
        Rows per chunk. None: as many rows as fit one block of float32 logits of 64 MiB on CPU,
        512 MiB on CUDA. The vocabulary is additionally split in blocks of `VOCAB_BLOCK` columns.

    Returns
    -------
    logprobs : Tensor (..., k), float32
        The exact log-softmax at T (full-vocabulary log-sum-exp) of the top-k columns, sorted in
        descending order.
    indices : Tensor (..., k), int64
        Their vocabulary indices.

    Runs under `torch.no_grad()`; peak extra memory is one block of float32 logits (see the
    module docstring), never `(N, V)`.
    """
    _check_float_tensor("teacher_hidden", teacher_hidden)
    _check_float_tensor("teacher_weight", teacher_weight)
    if teacher_weight.dim() != 2:
        raise ValueError(f"teacher_weight must be 2-D (V, H), got shape "
                         f"{tuple(teacher_weight.shape)}")
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher_hidden must have shape (..., H) with H = "
                         f"teacher_weight.shape[1] = {teacher_weight.shape[1]}, got "
                         f"{tuple(teacher_hidden.shape)}")
    vocab = teacher_weight.shape[0]
    if teacher_bias is not None:
        _check_float_tensor("teacher_bias", teacher_bias)
        if tuple(teacher_bias.shape) != (vocab,):
            raise ValueError(f"teacher_bias must have shape ({vocab},), got "
                             f"{tuple(teacher_bias.shape)}")
    for name, t in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if t is not None and t.device != teacher_hidden.device:
            raise ValueError(f"{name} is on {t.device} but teacher_hidden is on "
                             f"{teacher_hidden.device}")
    _check_options(k, temperature, softcap, chunk_size, vocab)
    k, temperature = int(k), float(temperature)
    softcap = None if softcap is None else float(softcap)

    lead = teacher_hidden.shape[:-1]
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    rows_total = hidden.shape[0]
    cdt = _compute_dtype(teacher_hidden, teacher_weight, teacher_bias)
    cols = min(vocab, VOCAB_BLOCK)
    if teacher_weight.dtype != cdt:  # a float32 copy of each weight block: keep it in budget
        budget = _CHUNK_BYTES["cuda" if hidden.device.type == "cuda" else "cpu"]
        cols = max(1, min(cols, budget // (4 * max(1, teacher_weight.shape[1]))))
    rows = int(chunk_size) if chunk_size is not None else _default_rows(hidden.device, cols)
    out_lp = torch.empty(rows_total, k, dtype=torch.float32, device=hidden.device)
    out_idx = torch.empty(rows_total, k, dtype=torch.int64, device=hidden.device)
    # The weight is cast block by block (a float32 copy of one block, not of W).
    blocks = [(c0, min(vocab, c0 + cols)) for c0 in range(0, vocab, cols)]
    single = len(blocks) == 1
    w_full = teacher_weight.to(cdt) if single else None
    b_full = teacher_bias.to(cdt) if (single and teacher_bias is not None) else None
    with _no_autocast(hidden.device):
        for r0 in range(0, rows_total, rows):
            h = hidden[r0:r0 + rows].to(cdt)
            acc = _RunningTopK(k)
            for c0, c1 in blocks:
                w = w_full if single else teacher_weight[c0:c1].to(cdt)
                z = h @ w.T
                if teacher_bias is not None:
                    z = z + (b_full if single else teacher_bias[c0:c1].to(cdt))
                acc.update(_scaled(z, temperature, softcap), c0)
                del z
            lp, idx = acc.result()
            out_lp[r0:r0 + rows] = lp
            out_idx[r0:r0 + rows] = idx
    return out_lp.reshape(*lead, k), out_idx.reshape(*lead, k)


@torch.no_grad()
def topk_teacher_logprobs_from_logits(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities at `temperature` of teacher logits that already exist.

    Parameters
    ----------
    logits : Tensor (..., V), float32 / bfloat16 / float16 / float64
        Teacher logits (any strides). Rows are converted to float32 a chunk at a time.
    k : int
        Number of entries kept per row, `1 <= k <= V`.
    temperature : float
        Distillation temperature T > 0.
    softcap : float or None
        Soft-capping `c * tanh(z / c)` applied before dividing by T.

    Returns
    -------
    logprobs : Tensor (..., k), float32
        `log_softmax(cap(logits) / T)` at the top-k columns, sorted descending.
    indices : Tensor (..., k), int64
        Their vocabulary indices.
    """
    _check_float_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got "
                         f"{tuple(logits.shape)}")
    vocab = logits.shape[-1]
    _check_options(k, temperature, softcap, None, vocab)
    k, temperature = int(k), float(temperature)
    softcap = None if softcap is None else float(softcap)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab)
    cdt = _compute_dtype(logits)
    rows = _default_rows(flat.device, vocab)
    out_lp = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    out_idx = torch.empty(flat.shape[0], k, dtype=torch.int64, device=flat.device)
    with _no_autocast(flat.device):
        for r0 in range(0, flat.shape[0], rows):
            z = _scaled(flat[r0:r0 + rows].to(cdt), temperature, softcap)
            acc = _RunningTopK(k)
            acc.update(z, 0)
            lp, idx = acc.result()
            out_lp[r0:r0 + rows] = lp
            out_idx[r0:r0 + rows] = idx
    return out_lp.reshape(*lead, k), out_idx.reshape(*lead, k)
