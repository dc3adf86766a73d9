"""Vocab-parallel loss on 3 and 2 gloo ranks (CPU) against the single-process loss.

Each spawned rank rebuilds the same full logits from a seed, keeps its vocabulary slice, runs
`fastkd.distributed.vocab_parallel_distillation_loss` over every case and saves its loss and
gradient slices to a file; the parent asserts there (a failing rank fails the test), against
`fastkd.distillation_loss(backend="torch")` on the full logits and the float64 oracle.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_cases import check_cases, run_cases
from distributed_dtensor_cases import check_dtensor_cases, run_dtensor_cases
from oracle import oracle_with_grads, random_logits, random_target, row_weights

import fastkd
from fastkd.distributed import (
    vocab_parallel_distillation_loss,
    vocab_parallel_fused_linear_distillation_loss,
    vocab_parallel_sparse_distillation_loss,
)

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
SPLITS = {2: (13, 8), 3: (7, 5, 9)}  # uneven slices of V = 21
LEAD = (3, 5)
REL = 1e-5


def _case(name, **overrides):
    case = dict(name=name, splits=None, order=None, scale=3.0, target="ignored", kw={},
                teacher_grad=False, inf_teacher=False, dtype=torch.float32, bad=None,
                teacher_dtype=None)
    case.update(overrides)
    return case


def build_cases(world: int) -> list:
    """Every divergence with / without target, teacher grad, softcap + smoothing, -inf
    teacher columns in one rank's slice, reductions, permuted slices, a larger vocabulary."""
    cases = []
    for div in DIVERGENCES:
        cases.append(_case(f"{div}-target", kw=dict(divergence=div, temperature=2.0, alpha=0.3)))
        cases.append(_case(f"{div}-notarget", target=None,
                           kw=dict(divergence=div, temperature=1.0, reduction="sum")))
        cases.append(_case(f"{div}-tgrad-none", teacher_grad=True,
                           kw=dict(divergence=div, temperature=1.0, reduction="none")))
    for div in ("kl", "jsd", "tvd"):
        cases.append(_case(f"{div}-inf-teacher", inf_teacher=True,
                           kw=dict(divergence=div, temperature=2.0, alpha=0.4)))
    cases += [
        _case("kl-softcap-smoothing", kw=dict(divergence="kl", temperature=1.5, softcap=5.0,
                                              label_smoothing=0.1)),
        _case("jsd-softcap-smoothing-tgrad", teacher_grad=True,
              kw=dict(divergence="jsd", beta=0.3, temperature=1.0, softcap=4.0,
                      label_smoothing=0.2)),
        _case("ce-only-smoothing", kw=dict(alpha=1.0, temperature=3.0, label_smoothing=0.1)),
        _case("rkl-num-items", kw=dict(divergence="reverse_kl", temperature=2.0,
                                       num_items_in_batch=7.0, scale_by_t2=False)),
        _case("tvd-all-ignored", target="all_ignored", kw=dict(divergence="tvd")),
        _case("kl-permuted-slices", order=tuple(reversed(range(world))),
              kw=dict(divergence="kl", temperature=2.0)),
        _case("kl-float64", dtype=torch.float64, kw=dict(divergence="kl", temperature=2.0)),
        _case("rkl-bfloat16", dtype=torch.bfloat16, teacher_grad=True,
              kw=dict(divergence="reverse_kl", temperature=2.0, alpha=0.3)),
        _case("jsd-bf16-student-fp32-teacher", dtype=torch.bfloat16,
              teacher_dtype=torch.float32, kw=dict(divergence="jsd", temperature=2.0)),
        _case("kl-fp32-student-fp64-teacher-tgrad", teacher_dtype=torch.float64,
              teacher_grad=True, kw=dict(divergence="kl", temperature=2.0, alpha=0.3)),
        _case("jsd-v1000", splits=(300, 700) if world == 2 else (401, 99, 500), scale=5.0,
              kw=dict(divergence="jsd", temperature=1.0, alpha=0.2)),
        _case("kl-extreme-logits", scale=1e4, kw=dict(divergence="kl", temperature=1.0)),
        _case("rkl-extreme-logits", scale=1e4, kw=dict(divergence="reverse_kl", temperature=3.0)),
        _case("err-label", bad="label", kw=dict(divergence="kl")),
        _case("err-overlap", bad="overlap", kw=dict(divergence="kl")),
    ]
    return cases


def make_inputs(case: dict, world: int):
    """Full (LEAD + (V,)) student / teacher logits, target, and each rank's (start, stop)."""
    splits = case["splits"] or SPLITS[world]
    vocab = sum(splits)
    s = random_logits(*LEAD, vocab, scale=case["scale"], dtype=case["dtype"], seed=11)
    t = random_logits(*LEAD, vocab, scale=case["scale"], seed=12,
                      dtype=case["teacher_dtype"] or case["dtype"])
    starts = [sum(splits[:i]) for i in range(len(splits))]
    order = case["order"] or tuple(range(world))
    bounds = [(starts[order[r]], starts[order[r]] + splits[order[r]]) for r in range(world)]
    if case["inf_teacher"]:
        lo, hi = bounds[-1]
        t[..., lo:hi:2] = -math.inf          # padded columns inside the last rank's slice
        t[0, :3, lo:hi] = -math.inf          # rows whose whole slice is -inf on that rank
    y = None
    if case["target"] is not None:
        frac = 1.0 if case["target"] == "all_ignored" else 0.3
        y = random_target(*LEAD, vocab=vocab, ignore_fraction=frac, seed=13)
        y[0, 0] = bounds[-1][0]              # a label inside the last slice, for sure
    if case["bad"] == "label":
        y[1, 1] = vocab
    return s, t, y, bounds


def _scalar(loss):
    return loss if loss.dim() == 0 else (loss * row_weights(loss.shape).to(loss.dtype)).sum()


def run_rank_case(rank: int, world: int, case: dict, group) -> dict:
    s, t, y, bounds = make_inputs(case, world)
    lo, hi = bounds[rank]
    start = lo
    if case["bad"] == "overlap" and rank == world - 1:
        start = lo - 1
    s_shard = s[..., lo:hi].clone().requires_grad_(True)
    t_shard = t[..., lo:hi].clone().requires_grad_(case["teacher_grad"])
    try:
        loss = vocab_parallel_distillation_loss(s_shard, t_shard, y, vocab_start_index=start,
                                                group=group, **case["kw"])
    except ValueError as exc:
        return dict(error=str(exc))
    inputs = (s_shard, t_shard) if case["teacher_grad"] else (s_shard,)
    grads = torch.autograd.grad(_scalar(loss), inputs)
    return dict(loss=loss.detach(), grad_s=grads[0],
                grad_t=grads[1] if case["teacher_grad"] else None)


PAIR = (1, 2)  # the 2-process cases run on a subgroup whose ranks differ from global ranks


def _rank_results(rank: int, world: int, group, mesh) -> dict:
    """dense: this module's cases; tp: fused lm-head, top-k, components (distributed_cases);
    dtensor: the DTensor routes (distributed_dtensor_cases)."""
    return dict(dense={c["name"]: run_rank_case(rank, world, c, group)
                       for c in build_cases(world)},
                tp=run_cases(rank, world, group),
                dtensor=run_dtensor_cases(rank, world, mesh))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One 3-process gloo world: the 3-rank cases on the default group (group=None; DTensors
    on a 2-D (1, 3) mesh sharded on its second dimension), then the 2-rank cases on the
    subgroup PAIR (exercises `group=`; a 1-D mesh over it); saves {world: results}."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=3, timeout=timedelta(seconds=60))
    try:
        pair = dist.new_group(list(PAIR))  # every rank must take part in new_group
        mesh = init_device_mesh("cpu", (1, 3), mesh_dim_names=("dp", "tp"))
        results = {3: _rank_results(rank, 3, None, mesh)}
        if rank in PAIR:
            results[2] = _rank_results(PAIR.index(rank), 2, pair,
                                       DeviceMesh.from_group(pair, "cpu"))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_rel(actual, expected, what, rel=REL):
    """max |actual - expected| <= rel * max |expected| (exact when expected is all 0)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def _single_process(case, s, t, y):
    """The single-process fastkd torch-backend loss and gradients on the full logits."""
    s_full = s.clone().requires_grad_(True)
    t_full = t.clone().requires_grad_(case["teacher_grad"])
    loss = fastkd.distillation_loss(s_full, t_full, y, backend="torch", **case["kw"])
    inputs = (s_full, t_full) if case["teacher_grad"] else (s_full,)
    grads = torch.autograd.grad(_scalar(loss), inputs)
    return loss.detach(), grads[0], (grads[1] if case["teacher_grad"] else None)


def _eager_bf16_rel(case, s, t, y, o_gs, o_gt):
    """2x the relative gradient error of the eager bf16 formula (docs/semantics.md §10)."""
    _, e_gs, e_gt = oracle_with_grads(s, t, y, teacher_grad=case["teacher_grad"],
                                      dtype=torch.bfloat16, **case["kw"])
    pairs = [(e_gs, o_gs)] + ([(e_gt, o_gt)] if case["teacher_grad"] else [])
    rel = max(((e.double() - o).abs().max() / o.abs().max()).item() for e, o in pairs)
    return 2.0 * max(rel, 2.0**-8)


def _check_case(case, world, results):
    name = case["name"]
    per_rank = [r[name] for r in results]
    if case["bad"] is not None:
        messages = [r.get("error") for r in per_rank]
        assert all(m is not None for m in messages), f"{name}: a rank did not raise"
        expected_word = "target" if case["bad"] == "label" else "vocab_start_index"
        assert all(m == messages[0] and expected_word in m for m in messages), messages
        return
    s, t, y, bounds = make_inputs(case, world)
    ref_loss, ref_gs, ref_gt = _single_process(case, s, t, y)
    o_loss, o_gs, o_gt = oracle_with_grads(s, t, y, teacher_grad=case["teacher_grad"],
                                           **case["kw"])
    # Losses are float32 maths on exactly upcast inputs. bf16 gradients: vs the single
    # process (same roundings) within one bf16 rounding; vs the oracle docs/semantics.md §10's rule,
    # at most twice the error of the same formula evaluated eagerly in bf16.
    grad_rel = oracle_rel = REL
    if case["dtype"] == torch.bfloat16:
        grad_rel = 2.0**-8
        oracle_rel = _eager_bf16_rel(case, s, t, y, o_gs, o_gt)
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"{name} rank {rank}: {res.get('error')}"
        assert torch.equal(res["loss"], per_rank[0]["loss"]), f"{name}: ranks disagree"
        lo, hi = bounds[rank]
        where = f"{name} rank {rank}"
        _assert_rel(res["loss"], ref_loss, f"{where} loss vs single process")
        _assert_rel(res["loss"], o_loss, f"{where} loss vs float64 oracle")
        assert res["grad_s"].dtype == case["dtype"]
        checks = [("student", res["grad_s"], ref_gs, o_gs)]
        if case["teacher_grad"]:
            checks.append(("teacher", res["grad_t"], ref_gt, o_gt))
        for who, got, single, oracle in checks:
            _assert_rel(got, single[..., lo:hi], f"{where} {who} grad vs single", grad_rel)
            _assert_rel(got, oracle[..., lo:hi], f"{where} {who} grad vs oracle", oracle_rel)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Spawns the 3 gloo processes once (process start-up dominates the run time)."""
    out = tmp_path_factory.mktemp("vocab_parallel")
    mp.spawn(_worker, args=(str(out / "rendezvous"), str(out)), nprocs=3, join=True)
    per_rank = [torch.load(out / f"rank{r}.pt") for r in range(3)]
    return {3: [res[3] for res in per_rank], 2: [per_rank[r][2] for r in PAIR]}


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world, rank_results):
    results = [r["dense"] for r in rank_results[world]]
    cases = build_cases(world)
    assert all(set(r) == {c["name"] for c in cases} for r in results)
    for case in cases:
        _check_case(case, world, results)


def test_rejects_bad_arguments_before_any_collective():
    s, t = random_logits(4, 6, seed=1), random_logits(4, 6, seed=2)
    y = random_target(4, vocab=6, seed=3)
    with pytest.raises(TypeError, match="vocab_start_index"):
        vocab_parallel_distillation_loss(s, t, y, vocab_start_index=1.0)
    with pytest.raises(ValueError, match="vocab_start_index"):
        vocab_parallel_distillation_loss(s, t, y, vocab_start_index=-1)
    with pytest.raises(ValueError, match="teacher_logits"):
        vocab_parallel_distillation_loss(s, t[:, :5], y, vocab_start_index=0)
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_distillation_loss(s, t, y[:3], vocab_start_index=0)
    with pytest.raises(TypeError, match="target"):
        vocab_parallel_distillation_loss(s, t, y.float(), vocab_start_index=0)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_distillation_loss(s, t, y, vocab_start_index=0, temperature=0.0)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="process group"):
            vocab_parallel_distillation_loss(s, t, y, vocab_start_index=0)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_fused_sparse_components(world, rank_results):
    """Fused lm-head (every divergence; mean with ignored rows, sum, none; hidden, weight
    and bias gradients), top-k teacher (every divergence and tail, k = V), loss components,
    and mismatched slices / bad labels / bad indices raising on every rank."""
    check_cases(world, [r["tp"] for r in rank_results[world]])


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_routing(world, rank_results):
    """DTensor Shard(-1) logits (teacher gradient too), Shard(0) heads, Replicate, the
    module, and bad placements raising naming the argument."""
    check_dtensor_cases(world, [r["dtensor"] for r in rank_results[world]])


def test_fused_and_sparse_reject_bad_arguments_before_any_collective():
    fused = vocab_parallel_fused_linear_distillation_loss
    sparse = vocab_parallel_sparse_distillation_loss
    h, w = random_logits(4, 3, seed=1), random_logits(5, 3, seed=2)
    y = random_target(4, vocab=5, seed=3)
    with pytest.raises(ValueError, match="teacher_weight_shard"):
        fused(h, w, h, w[:4], y, vocab_start_index=0)
    with pytest.raises(ValueError, match="student_weight_shard"):
        fused(h, w[:, :2], h, w, y, vocab_start_index=0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused(h, w, h, w, y, vocab_start_index=0, chunk_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fused(h, w, h, w, y, vocab_start_index=0, backend="cpu")
    s = random_logits(4, 5, seed=4)
    lp, idx = torch.log_softmax(random_logits(4, 9, seed=5), -1).topk(3)
    with pytest.raises(ValueError, match="teacher_temperature"):
        sparse(s, lp, idx, y, vocab_start_index=0, temperature=2.0, teacher_temperature=1.0)
    with pytest.raises(ValueError, match="teacher_topk_indices"):
        sparse(s, lp, idx[:, :2], y, vocab_start_index=0)
    with pytest.raises(ValueError, match="unique"):
        sparse(s, lp, idx[:, [0, 0, 1]], y, vocab_start_index=0)
    with pytest.raises(ValueError, match="tail"):
        sparse(s, lp, idx, y, vocab_start_index=0, tail="drop")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="process group"):
            sparse(s, lp, idx, y, vocab_start_index=0)
        with pytest.raises(RuntimeError, match="process group"):
            fused(h, w, h, w, y, vocab_start_index=0)
