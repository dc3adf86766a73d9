"""`fastkd.topk`: top-k teacher log-probabilities against the full log_softmax."""

import math

import pytest
import torch

import fastkd.topk as topk_mod
from fastkd.topk import topk_teacher_logprobs, topk_teacher_logprobs_from_logits


def _reference(logits, k, temperature=1.0, softcap=None):
    """float64 log_softmax(cap(z) / T) and its top-k (values, indices)."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    full = torch.log_softmax(z / temperature, dim=-1)
    vals, idx = full.topk(k, dim=-1)
    return full, vals, idx


def _check(lp, idx, logits, k, temperature=1.0, softcap=None, rtol=1e-5):
    full, ref_vals, ref_idx = _reference(logits, k, temperature, softcap)
    assert lp.dtype == torch.float32 and idx.dtype == torch.int64
    assert lp.shape == logits.shape[:-1] + (k,) == idx.shape
    # values are the exact log-softmax of the returned columns, sorted descending
    torch.testing.assert_close(lp.double(), full.gather(-1, idx), rtol=rtol, atol=rtol)
    torch.testing.assert_close(lp.double(), ref_vals, rtol=rtol, atol=rtol)
    assert bool((lp[..., 1:] <= lp[..., :-1]).all())
    # the columns are the top-k (compare as sets where the k-th value is not a near tie)
    assert bool((idx.sort(-1).values[..., 1:] != idx.sort(-1).values[..., :-1]).all())
    gap = ref_vals[..., -1] - full.sort(-1, descending=True).values[..., k:k + 1].squeeze(-1) \
        if k < logits.shape[-1] else torch.ones(logits.shape[:-1], dtype=torch.float64)
    clear = gap > 1e-4
    assert bool(clear.any())
    assert torch.equal(idx.sort(-1).values[clear], ref_idx.sort(-1).values[clear])


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (2.0, None), (0.5, 30.0),
                                                 (3.0, 5.0)])
def test_hidden_matches_full_log_softmax(temperature, softcap):
    torch.manual_seed(0)
    n, h, v, k = 50, 32, 1003, 17
    hidden = torch.randn(2, n // 2, h)
    weight = torch.randn(v, h) * 0.6
    bias = torch.randn(v)
    lp, idx = topk_teacher_logprobs(hidden, weight, k, teacher_bias=bias,
                                    temperature=temperature, softcap=softcap, chunk_size=7)
    logits = hidden.double() @ weight.double().T + bias.double()
    _check(lp, idx, logits, k, temperature, softcap)


def test_chunked_equals_unchunked_and_vocab_blocks(monkeypatch):
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 24), torch.randn(777, 24)
    base = topk_teacher_logprobs(hidden, weight, 32, temperature=1.5)
    rows = topk_teacher_logprobs(hidden, weight, 32, temperature=1.5, chunk_size=3)
    monkeypatch.setattr(topk_mod, "VOCAB_BLOCK", 50)  # 16 vocabulary blocks, k=32 < block
    blocks = topk_teacher_logprobs(hidden, weight, 32, temperature=1.5, chunk_size=9)
    monkeypatch.setattr(topk_mod, "VOCAB_BLOCK", 20)  # block smaller than k
    small = topk_teacher_logprobs(hidden, weight, 32, temperature=1.5, chunk_size=64)
    for lp, idx in (rows, blocks, small):
        torch.testing.assert_close(lp, base[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(idx, base[1])
    _check(*small, hidden.double() @ weight.double().T, 32, temperature=1.5)


def test_k_equals_vocab_is_the_full_distribution():
    torch.manual_seed(2)
    hidden, weight = torch.randn(6, 8), torch.randn(13, 8) * 3
    lp, idx = topk_teacher_logprobs(hidden, weight, 13, temperature=0.7)
    torch.testing.assert_close(torch.logsumexp(lp, -1), torch.zeros(6), atol=1e-6, rtol=0)
    _check(lp, idx, hidden.double() @ weight.double().T, 13, temperature=0.7)


def test_mixed_low_precision_inputs_compute_in_float32():
    torch.manual_seed(3)
    hidden = torch.randn(20, 16).to(torch.bfloat16)
    weight = (torch.randn(300, 16) * 0.5).to(torch.float16)
    bias = torch.randn(300)
    lp, idx = topk_teacher_logprobs(hidden, weight, 5, teacher_bias=bias, chunk_size=4)
    # exact for the logits of the rounded inputs computed in float32 / float64
    logits = hidden.double() @ weight.double().T + bias.double()
    _check(lp, idx, logits, 5)


def test_masked_vocabulary_columns():
    torch.manual_seed(4)
    hidden, weight = torch.randn(5, 8), torch.randn(40, 8)
    bias = torch.zeros(40)
    bias[30:] = -math.inf  # padded vocabulary
    lp, idx = topk_teacher_logprobs(hidden, weight, 4, teacher_bias=bias)
    assert bool((idx < 30).all()) and bool(torch.isfinite(lp).all())
    _check(lp, idx, hidden.double() @ weight.double().T + bias.double(), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_from_logits(dtype):
    torch.manual_seed(5)
    logits = (torch.randn(3, 9, 517) * 4).to(dtype)
    lp, idx = topk_teacher_logprobs_from_logits(logits[:, :-1], 8, temperature=2.0,
                                                softcap=20.0)
    _check(lp, idx, logits[:, :-1].double(), 8, 2.0, 20.0)


def test_no_grad_and_empty_rows():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    lp, idx = topk_teacher_logprobs(hidden, weight, 3)
    assert not lp.requires_grad
    lp, idx = topk_teacher_logprobs(torch.randn(0, 8), weight.detach(), 3)
    assert lp.shape == (0, 3) and idx.shape == (0, 3)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(k=0), ValueError, "k"),
    (dict(k=21), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"),
    (dict(k=True), TypeError, "k"),
    (dict(k=3, temperature=0.0), ValueError, "temperature"),
    (dict(k=3, temperature=float("nan")), ValueError, "temperature"),
    (dict(k=3, softcap=-1.0), ValueError, "softcap"),
    (dict(k=3, chunk_size=0), ValueError, "chunk_size"),
    (dict(k=3, chunk_size=2.5), TypeError, "chunk_size"),
    (dict(k=3, teacher_bias=torch.randn(19)), ValueError, "teacher_bias"),
    (dict(k=3, teacher_bias=torch.ones(20, dtype=torch.int64)), TypeError, "teacher_bias"),
])
def test_validation_names_the_argument(kwargs, exc, word):
    hidden, weight = torch.randn(4, 8), torch.randn(20, 8)
    k = kwargs.pop("k")
    with pytest.raises(exc, match=word):
        topk_teacher_logprobs(hidden, weight, k, **kwargs)


def test_validation_of_tensors():
    with pytest.raises(TypeError, match="teacher_hidden"):
        topk_teacher_logprobs(torch.ones(4, 8, dtype=torch.int64), torch.randn(20, 8), 3)
    with pytest.raises(ValueError, match="teacher_hidden"):
        topk_teacher_logprobs(torch.randn(4, 7), torch.randn(20, 8), 3)
    with pytest.raises(ValueError, match="teacher_weight"):
        topk_teacher_logprobs(torch.randn(4, 8), torch.randn(20, 8, 1), 3)
    with pytest.raises(TypeError, match="logits"):
        topk_teacher_logprobs_from_logits(torch.ones(4, 8, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="k"):
        topk_teacher_logprobs_from_logits(torch.randn(4, 8), 9)


def test_peak_is_one_block_of_logits(monkeypatch):
    """No logits larger than chunk_size x block exist: every block folded in is that small."""
    shapes = []
    real = topk_mod._RunningTopK.update

    def spy(self, z, col0):
        shapes.append(tuple(z.shape))
        return real(self, z, col0)

    monkeypatch.setattr(topk_mod._RunningTopK, "update", spy)
    monkeypatch.setattr(topk_mod, "VOCAB_BLOCK", 64)
    hidden, weight = torch.randn(30, 8), torch.randn(300, 8).to(torch.bfloat16)
    topk_teacher_logprobs(hidden, weight, 4, chunk_size=8)
    assert max(r for r, _ in shapes) == 8 and max(c for _, c in shapes) == 64
    assert sum(c for _, c in shapes) == 300 * 4  # 4 row chunks, each over the vocabulary
    monkeypatch.setattr(topk_mod, "_CHUNK_BYTES", {"cpu": 4 * 8 * 16, "cuda": 1})
    shapes.clear()  # a bf16 weight is cast block by block: the block shrinks to the budget
    topk_teacher_logprobs(hidden, weight, 4)
    assert max(c for _, c in shapes) == 16 and max(r for r, _ in shapes) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_reference(dtype):
    torch.manual_seed(6)
    hidden = torch.randn(64, 128).to(dtype)
    weight = (torch.randn(50257, 128) * 0.2).to(dtype)
    lp, idx = topk_teacher_logprobs(hidden.cuda(), weight.cuda(), 32, temperature=2.0,
                                    chunk_size=16)
    assert lp.device.type == "cuda" and idx.device.type == "cuda"
    _check(lp.cpu(), idx.cpu(), hidden.double() @ weight.double().T, 32, temperature=2.0,
           rtol=1e-4)


def test_autocast_region_keeps_float32():
    torch.manual_seed(7)
    hidden, weight = torch.randn(12, 16), torch.randn(200, 16)
    base = topk_teacher_logprobs(hidden, weight, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = topk_teacher_logprobs(hidden, weight, 6)
    assert torch.equal(cast[0], base[0]) and torch.equal(cast[1], base[1])
