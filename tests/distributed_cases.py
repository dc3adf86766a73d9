"""Cases of the tensor-parallel tests: fused lm-head, top-k teacher, loss components, DTensor.

`run_cases(rank, world, group, mesh)` runs in each spawned gloo rank (see
tests/test_distributed.py) and returns plain tensors; `check_cases(world, per_rank)` runs
in the pytest process and compares them with the single-process fastkd losses
(backend="torch") and, for the fused lm-head and the components, the float64 oracle.
Every rank rebuilds the same full inputs from fixed seeds and keeps its slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from oracle import oracle_loss, oracle_with_grads, random_logits, random_target, row_weights

import fastkd
from fastkd.distributed import (
    vocab_parallel_distillation_loss,
    vocab_parallel_fused_linear_distillation_loss,
    vocab_parallel_sparse_distillation_loss,
)

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
SPLITS = {2: (13, 8), 3: (7, 5, 9)}  # uneven slices of V = 21
N_ROWS, HS, HT = 10, 6, 5
REL = 1e-5


def _bounds(world, splits=None):
    splits = splits or SPLITS[world]
    starts = [sum(splits[:i]) for i in range(world)]
    return [(a, a + b) for a, b in zip(starts, splits)], sum(splits)


def _chunk_bounds(vocab, world):
    """The torch.chunk (DTensor Shard) layout of `vocab` columns over `world` ranks."""
    full = -(-vocab // world)
    return [(min(r * full, vocab), min(vocab, (r + 1) * full)) for r in range(world)]


def _scalar(loss):
    return loss if loss.dim() == 0 else (loss * row_weights(loss.shape).to(loss.dtype)).sum()


def _target(vocab, seed, kind="ignored"):
    if kind is None:
        return None
    return random_target(N_ROWS, vocab=vocab, ignore_fraction=0.3, seed=seed)


def assert_rel(actual, expected, what, rel=REL):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


# --- fused lm-head --------------------------------------------------------------------------

FUSED = [dict(name=f"fused-{d}-{red}", div=d, red=red, target=t, bias=b, chunk=c)
         for d in DIVERGENCES
         for red, t, b, c in (("mean", "ignored", True, 3), ("sum", None, False, None))]
FUSED += [dict(name="fused-jsd-none", div="jsd", red="none", target="ignored", bias=True,
               chunk=4)]


def _fused_inputs(world):
    bounds, vocab = _bounds(world)
    hs, ht = random_logits(N_ROWS, HS, scale=1.0, seed=21), random_logits(N_ROWS, HT, seed=22)
    ws, wt = random_logits(vocab, HS, scale=1.0, seed=23), random_logits(vocab, HT, seed=24)
    bs, bt = random_logits(vocab, seed=25), random_logits(vocab, seed=26)
    return hs, ws, bs, ht, wt, bt, bounds, vocab


def _fused_kw(case):
    return dict(divergence=case["div"], temperature=2.0, alpha=0.4, reduction=case["red"])


class _Spy:
    """Records the collectives and the largest block of logits the fused sweep forms."""

    def __init__(self):
        import fastkd.ops.vocab_parallel_fused as fused_ops
        self.modules, self.calls, self.rows = (dist, fused_ops), [], 0

    def __enter__(self):
        dist_mod, fused_ops = self.modules
        self.saved = (dist_mod.all_gather, dist_mod.all_reduce, fused_ops._linear)
        gather, reduce, linear = self.saved

        def spy(name, fn):
            def wrapped(*a, **k):
                self.calls.append(name)
                return fn(*a, **k)
            return wrapped

        def spy_linear(*a):
            out = linear(*a)
            self.rows = max(self.rows, out.shape[0])
            return out

        dist_mod.all_gather, dist_mod.all_reduce = spy("gather", gather), spy("reduce", reduce)
        fused_ops._linear = spy_linear
        return self

    def __exit__(self, *exc):
        dist_mod, fused_ops = self.modules
        dist_mod.all_gather, dist_mod.all_reduce, fused_ops._linear = self.saved


def run_fused(rank, world, group, case):
    hs, ws, bs, ht, wt, bt, bounds, vocab = _fused_inputs(world)
    lo, hi = bounds[rank]
    h = hs.clone().requires_grad_(True)
    w = ws[lo:hi].clone().requires_grad_(True)
    b = bs[lo:hi].clone().requires_grad_(True) if case["bias"] else None
    y = _target(vocab, 27, case["target"])
    with _Spy() as spy:
        loss, ce, div = vocab_parallel_fused_linear_distillation_loss(
            h, w, ht, wt[lo:hi], y, vocab_start_index=lo, group=group, student_bias_shard=b,
            teacher_bias_shard=bt[lo:hi] if case["bias"] else None, chunk_size=case["chunk"],
            return_components=True, **_fused_kw(case))
        inputs = (h, w) + ((b,) if b is not None else ())
        grads = torch.autograd.grad(_scalar(loss), inputs)
    return dict(loss=loss.detach(), ce=ce, div=div, grads=grads, calls=spy.calls,
                logit_rows=spy.rows)


def _check_fused_traffic(case, res, where):
    """One all_gather of statistics per chunk and sweep (jsd / tvd: one all_reduce more),
    one all_reduce of the hidden gradient, one to agree on the default chunk; never more
    than one chunk of logits."""
    chunk = case["chunk"] or N_ROWS  # the default here covers the 10 rows at once
    chunks = -(-N_ROWS // chunk)
    sweeps = 2 if case["red"] == "none" else 1  # "none" sweeps again in backward
    reduces = chunks * sweeps * (case["div"] in ("jsd", "tvd")) + 1 + (case["chunk"] is None)
    assert res["calls"].count("gather") == chunks * sweeps, (where, res["calls"])
    assert res["calls"].count("reduce") == reduces, (where, res["calls"])
    assert res["logit_rows"] == chunk, (where, res["logit_rows"])


def check_fused(world, case, per_rank):
    hs, ws, bs, ht, wt, bt, bounds, vocab = _fused_inputs(world)
    y = _target(vocab, 27, case["target"])
    s_bias, t_bias = (bs, bt) if case["bias"] else (None, None)
    inputs = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    if case["bias"]:
        inputs.append(bs.clone().requires_grad_(True))
    single = fastkd.fused_linear_distillation_loss(
        inputs[0], inputs[1], ht, wt, y, student_bias=inputs[2] if case["bias"] else None,
        teacher_bias=t_bias, backend="torch", **_fused_kw(case))
    single_grads = torch.autograd.grad(_scalar(single), inputs)
    # float64 oracle through the logits: dL/dh = G W, dL/dW = G^T h, dL/db = sum G.
    s_logits = hs.double() @ ws.double().t() + (0 if s_bias is None else s_bias.double())
    t_logits = ht.double() @ wt.double().t() + (0 if t_bias is None else t_bias.double())
    kw = _fused_kw(case)
    o_loss, o_g, _ = oracle_with_grads(s_logits, t_logits, y, teacher_grad=False, **kw)
    oracle_grads = [o_g @ ws.double(), o_g.t() @ hs.double()] + ([o_g.sum(0)] * case["bias"])
    for rank, res in enumerate(per_rank):
        lo, hi = bounds[rank]
        where = f"{case['name']} rank {rank}"
        assert torch.equal(res["loss"], per_rank[0]["loss"]), f"{where}: ranks disagree"
        assert_rel(res["loss"], single.detach(), f"{where} loss vs single process")
        assert_rel(res["loss"], o_loss, f"{where} loss vs oracle")
        for i, (got, ref, orc) in enumerate(zip(res["grads"], single_grads, oracle_grads)):
            sl = (slice(None),) if i == 0 else (slice(lo, hi),)  # hidden: the FULL grad
            assert_rel(got, ref[sl], f"{where} grad {i} vs single process")
            assert_rel(got, orc[sl], f"{where} grad {i} vs oracle")
        _check_components(res, s_logits, t_logits, y, kw, where)
        _check_fused_traffic(case, res, where)


# --- loss components (dense logits) ---------------------------------------------------------

COMPONENTS = [dict(name=f"components-{d}", div=d, target=t, red=r)
              for d, t, r in (("kl", "ignored", "mean"), ("reverse_kl", "ignored", "sum"),
                              ("jsd", None, "mean"), ("tvd", "ignored", "none"))]


def _components_inputs(world):
    bounds, vocab = _bounds(world)
    return random_logits(N_ROWS, vocab, seed=31), random_logits(N_ROWS, vocab, seed=32), \
        bounds, vocab


def _components_kw(case):
    return dict(divergence=case["div"], temperature=2.0, alpha=0.3, reduction=case["red"],
                label_smoothing=0.1)


def run_components(rank, world, group, case):
    s, t, bounds, vocab = _components_inputs(world)
    lo, hi = bounds[rank]
    y = _target(vocab, 33, case["target"])
    loss, ce, div = vocab_parallel_distillation_loss(
        s[:, lo:hi], t[:, lo:hi], y, vocab_start_index=lo, group=group,
        return_components=True, **_components_kw(case))
    return dict(loss=loss, ce=ce, div=div)


def _check_components(res, s, t, y, kw, where):
    """ce / divergence against the float64 oracle, and the weighting identity."""
    k = kw["temperature"] ** 2
    if y is None:
        assert torch.equal(res["ce"], torch.zeros_like(res["ce"])), f"{where}: ce without target"
        assert_rel(res["loss"], k * res["div"], f"{where} loss == k * divergence")
    else:
        o_ce = oracle_loss(s, t, y, **{**kw, "alpha": 1.0})
        assert_rel(res["ce"], o_ce, f"{where} ce vs oracle")
        mixed = kw["alpha"] * res["ce"].double() + (1 - kw["alpha"]) * k * res["div"].double()
        assert_rel(res["loss"], mixed, f"{where} loss == alpha*ce + (1-alpha)*k*div")
    o_div = oracle_loss(s, t, y, **{**kw, "alpha": 0.0, "scale_by_t2": False,
                                    "label_smoothing": 0.0})
    assert_rel(res["div"], o_div, f"{where} divergence vs oracle")


def run_inplace(rank, world, group):
    """inplace_backward=True writes the gradient slice into the logits' own buffer: the same
    loss and gradient as without it."""
    s, t, bounds, vocab = _components_inputs(world)
    lo, hi = bounds[rank]
    y = _target(vocab, 34, "ignored")
    out = {}
    for inplace in (False, True):
        base = s[:, lo:hi].clone().requires_grad_(True)
        logits = base * 1.0  # a non-leaf, as logits from an lm-head are
        loss = vocab_parallel_distillation_loss(logits, t[:, lo:hi], y, vocab_start_index=lo,
                                                group=group, divergence="jsd",
                                                temperature=2.0, inplace_backward=inplace)
        out[inplace] = (loss.detach(), torch.autograd.grad(loss, base)[0],
                        logits.detach().clone())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss still computes in float32
        out["autocast"] = vocab_parallel_distillation_loss(
            s[:, lo:hi], t[:, lo:hi], y, vocab_start_index=lo, group=group,
            divergence="jsd", temperature=2.0)
    return out


def check_inplace(per_rank):
    for rank, res in enumerate(per_rank):
        (l0, g0, x0), (l1, g1, x1) = res[False], res[True]
        assert torch.equal(l0, l1) and torch.equal(g0, g1), f"inplace rank {rank}"
        assert torch.equal(x1, g0), f"rank {rank}: inplace_backward left the logits unwritten"
        assert not torch.equal(x0, g0), f"rank {rank}: logits overwritten without inplace"
        assert res["autocast"].dtype == torch.float32 and torch.equal(res["autocast"], l0)


def check_components(world, case, per_rank):
    s, t, _, vocab = _components_inputs(world)
    y = _target(vocab, 33, case["target"])
    for rank, res in enumerate(per_rank):
        _check_components(res, s, t, y, _components_kw(case), f"{case['name']} rank {rank}")


# --- top-k teacher --------------------------------------------------------------------------

SPARSE = [dict(name=f"sparse-{d}-{tail}", div=d, tail=tail, k=5, red="mean", target="ignored",
               smoothing=0.1)
          for d in DIVERGENCES for tail in ("bucket", "renormalize")]
SPARSE += [dict(name="sparse-kl-bucket-k=V-sum", div="kl", tail="bucket", k=None, red="sum",
                target=None, smoothing=0.0),
           dict(name="sparse-tvd-renormalize-none", div="tvd", tail="renormalize", k=3,
                red="none", target="ignored", smoothing=0.0),
           dict(name="sparse-jsd-renormalize-retempered", div="jsd", tail="renormalize", k=6,
                red="mean", target="ignored", smoothing=0.0, teacher_temperature=1.0)]


def _sparse_inputs(world, case):
    bounds, vocab = _bounds(world)
    s, t = random_logits(N_ROWS, vocab, seed=41), random_logits(N_ROWS, vocab, seed=42)
    lp, idx = torch.log_softmax(t / 2.0, -1).topk(case["k"] or vocab, dim=-1)
    y = _target(vocab, 43, case["target"])
    return s, t, lp, idx, y, bounds


def _sparse_kw(case):
    return dict(divergence=case["div"], temperature=2.0, alpha=0.3, reduction=case["red"],
                label_smoothing=case["smoothing"], tail=case["tail"])


def run_sparse(rank, world, group, case):
    s, t, lp, idx, y, bounds = _sparse_inputs(world, case)
    lo, hi = bounds[rank]
    shard = s[:, lo:hi].clone().requires_grad_(True)
    if case.get("teacher_temperature"):  # the same top-k entries, stored at T=1 (loss: T=2)
        lp = torch.log_softmax(t, -1).gather(-1, idx)
    loss = vocab_parallel_sparse_distillation_loss(
        shard, lp, idx, y, vocab_start_index=lo, group=group,
        teacher_temperature=case.get("teacher_temperature"), **_sparse_kw(case))
    return dict(loss=loss.detach(), grad=torch.autograd.grad(_scalar(loss), shard)[0])


def check_sparse(world, case, per_rank):
    s, t, lp, idx, y, bounds = _sparse_inputs(world, case)
    full = s.clone().requires_grad_(True)
    # re-tempered case: the same teacher at T=2 renormalised over its k entries is what the
    # stored T=1 log-probs become; the single process gets those directly.
    single = fastkd.sparse_distillation_loss(full, lp, idx, y, backend="torch",
                                             **_sparse_kw(case))
    grad = torch.autograd.grad(_scalar(single), full)[0]
    for rank, res in enumerate(per_rank):
        lo, hi = bounds[rank]
        where = f"{case['name']} rank {rank}"
        assert torch.equal(res["loss"], per_rank[0]["loss"]), f"{where}: ranks disagree"
        assert_rel(res["loss"], single.detach(), f"{where} loss vs single process")
        assert_rel(res["grad"], grad[:, lo:hi], f"{where} grad vs single process")
    if case["k"] is None:  # k = V with the bucket tail is the dense loss
        kw = {k: v for k, v in _sparse_kw(case).items() if k != "tail"}
        assert_rel(per_rank[0]["loss"], oracle_loss(s, t, y, **kw),
                   f"{case['name']}: k = V equals the dense loss")


# --- mismatched slices and bad indices: every rank raises the same ValueError ----------------

VP_ERRORS = {"sparse-overlap": "vocab_start_index", "fused-gap": "vocab_start_index",
             "sparse-index-range": "teacher_topk_indices", "fused-label": "target"}


def run_vp_error(rank, world, group, which):
    bounds, vocab = _bounds(world)
    lo, hi = bounds[rank]
    start = lo - 1 if rank == world - 1 and which.endswith(("overlap", "gap")) else lo
    if which == "fused-gap":
        start = lo + 1 if rank == world - 1 else lo
    try:
        if which.startswith("sparse"):
            case = dict(k=4, target="ignored")
            s, _, lp, idx, y, _ = _sparse_inputs(world, case)
            if which == "sparse-index-range":
                idx = idx.clone()
                idx[2, 0] = vocab
            vocab_parallel_sparse_distillation_loss(s[:, lo:hi], lp, idx, y,
                                                    vocab_start_index=start, group=group)
        else:
            hs, ws, _, ht, wt, _, _, _ = _fused_inputs(world)
            y = _target(vocab, 27, "ignored")
            if which == "fused-label":
                y[3] = vocab + 2
            vocab_parallel_fused_linear_distillation_loss(
                hs, ws[lo:hi], ht, wt[lo:hi], y, vocab_start_index=start, group=group,
                chunk_size=4)
    except ValueError as exc:
        return dict(error=str(exc))
    return dict(error=None)


def run_cases(rank, world, group) -> dict:
    """Every non-DTensor case of this module on this rank."""
    out = {c["name"]: run_fused(rank, world, group, c) for c in FUSED}
    out.update({c["name"]: run_sparse(rank, world, group, c) for c in SPARSE})
    out.update({c["name"]: run_components(rank, world, group, c) for c in COMPONENTS})
    out.update({name: run_vp_error(rank, world, group, name) for name in VP_ERRORS})
    out["inplace"] = run_inplace(rank, world, group)
    return out


def check_cases(world, per_rank) -> None:
    for cases, check in ((FUSED, check_fused), (SPARSE, check_sparse),
                         (COMPONENTS, check_components)):
        for case in cases:
            check(world, case, [r[case["name"]] for r in per_rank])
    check_inplace([r["inplace"] for r in per_rank])
    for name, word in VP_ERRORS.items():
        messages = [r[name]["error"] for r in per_rank]
        assert all(m is not None for m in messages), f"{name}: a rank did not raise"
        assert all(m == messages[0] and word in m for m in messages), (name, messages)
