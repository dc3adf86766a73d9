"""DTensor cases of the tensor-parallel tests (run in the spawned gloo ranks, checked in the
pytest process; see tests/distributed_cases.py and tests/test_distributed.py).

Logits are DTensors `Shard(-1)` on the vocabulary mesh dimension (the world-3 mesh is 2-D,
(1, 3), sharded on its second dimension; the world-2 mesh is 1-D over a subgroup) with
uneven torch.chunk shards; the heads of the fused loss are `Shard(0)` as ColwiseParallel
leaves them. Results are the loss's local value, its placements, and the gradients' local
shards and placements.
"""

from __future__ import annotations

from distributed_cases import N_ROWS, _chunk_bounds, _scalar, assert_rel
from oracle import oracle_with_grads, random_logits, random_target

import fastkd

VOCAB = {2: 21, 3: 20}  # torch.chunk shards: 11 + 10 and 7 + 7 + 6


def _placements(mesh, shard_dim):
    from torch.distributed.tensor import Replicate, Shard
    return [Shard(shard_dim) if i == mesh.ndim - 1 else Replicate() for i in range(mesh.ndim)]


def _names(placements):
    return tuple(type(p).__name__ + (f"({p.dim})" if p.is_shard() else "") for p in placements)


DTENSOR = [dict(name=f"dtensor-{d}-tgrad", div=d, red="mean", target=True) for d in
           ("kl", "reverse_kl", "jsd", "tvd")]
DTENSOR += [dict(name="dtensor-kl-sum-notarget", div="kl", red="sum", target=False),
            dict(name="dtensor-module-jsd", div="jsd", red="mean", target=True, module=True),
            dict(name="dtensor-replicate", div="kl", red="mean", target=True, replicate=True),
            dict(name="dtensor-fused", div="tvd", red="mean", target=True, fused=True)]


def _inputs(world):
    vocab = VOCAB[world]
    s, t = random_logits(N_ROWS, vocab, seed=51), random_logits(N_ROWS, vocab, seed=52)
    y = random_target(N_ROWS, vocab=vocab, ignore_fraction=0.3, seed=53)
    return s, t, y, vocab


def _kw(case):
    return dict(divergence=case["div"], temperature=2.0, alpha=0.4, reduction=case["red"])


def _fused_inputs(world):
    vocab = VOCAB[world]
    return (random_logits(N_ROWS, 6, scale=1.0, seed=54), random_logits(vocab, 6, seed=55),
            random_logits(N_ROWS, 5, scale=1.0, seed=56), random_logits(vocab, 5, seed=57),
            random_logits(vocab, seed=58))


def _replicated(tensor, mesh):
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _run_fused(mesh, world, case):
    from torch.distributed.tensor import distribute_tensor
    hs, ws, ht, wt, bt = _fused_inputs(world)
    _, _, y, _ = _inputs(world)
    shard0 = _placements(mesh, 0)
    h = hs.clone().requires_grad_(True)
    w = distribute_tensor(ws, mesh, shard0).requires_grad_(True)
    # Replicate() hidden states: the proof of tensor parallelism for a Shard(0) head.
    loss = fastkd.fused_linear_distillation_loss(
        _replicated(h, mesh), w, _replicated(ht, mesh), distribute_tensor(wt, mesh, shard0), y,
        teacher_bias=distribute_tensor(bt, mesh, shard0), chunk_size=4, **_kw(case))
    _scalar(loss).backward()
    return dict(loss=loss.to_local().detach(), loss_placements=_names(loss.placements),
                grads=[h.grad, w.grad.to_local()], placements=[_names(w.grad.placements)])


def run_dtensor(rank, world, mesh, case):
    from torch.distributed.tensor import Replicate, distribute_tensor
    if case.get("fused"):
        return _run_fused(mesh, world, case)
    s, t, y, _ = _inputs(world)
    y = y if case["target"] else None
    placements = ([Replicate()] * mesh.ndim if case.get("replicate")
                  else _placements(mesh, -1))
    sd = distribute_tensor(s, mesh, placements).requires_grad_(True)
    td = distribute_tensor(t, mesh, placements).requires_grad_(True)
    components = None
    if case.get("module"):
        loss = fastkd.DistillationLoss(**_kw(case))(sd, td, y)
    elif case["name"] == "dtensor-kl-sum-notarget":  # the route itself, with components
        from fastkd._dtensor import dtensor_distillation_loss
        loss, ce, div = dtensor_distillation_loss(sd, td, y, return_components=True,
                                                  **_kw(case))
        components = [(x.to_local(), _names(x.placements)) for x in (ce, div)]
    else:
        loss = fastkd.distillation_loss(sd, td, y, **_kw(case))
    _scalar(loss).backward()
    return dict(loss=loss.to_local().detach(), loss_placements=_names(loss.placements),
                grads=[sd.grad.to_local(), td.grad.to_local()],
                placements=[_names(sd.grad.placements), _names(td.grad.placements)],
                input_placements=_names(sd.placements), components=components)


def check_dtensor(world, case, per_rank):
    if case.get("fused"):
        hs, ws, ht, wt, bt = _fused_inputs(world)
        _, _, y, _ = _inputs(world)
        s_logits, t_logits = hs.double() @ ws.double().t(), ht.double() @ wt.double().t() + bt
        o_loss, o_g, _ = oracle_with_grads(s_logits, t_logits, y, teacher_grad=False,
                                           **_kw(case))
        refs = [o_g @ ws.double(), o_g.t() @ hs.double()]
        expected_placements = [_names(_placements_like(world, 0))]
    else:
        s, t, y, _ = _inputs(world)
        y = y if case["target"] else None
        o_loss, o_gs, o_gt = oracle_with_grads(s, t, y, teacher_grad=True, **_kw(case))
        refs = [o_gs, o_gt]
        expected_placements = [per_rank[0]["input_placements"]] * 2
    bounds = _chunk_bounds(VOCAB[world], world)
    for rank, res in enumerate(per_rank):
        where = f"{case['name']} rank {rank}"
        assert set(res["loss_placements"]) == {"Replicate"}, where
        assert_rel(res["loss"], o_loss, f"{where} loss vs oracle")
        assert res["placements"] == expected_placements, f"{where}: {res['placements']}"
        if res.get("components"):  # no target: ce = 0 and loss = T^2 * divergence
            (ce, ce_p), (div, div_p) = res["components"]
            assert set(ce_p) == set(div_p) == {"Replicate"}, where
            assert ce.item() == 0.0, where
            assert_rel(res["loss"], 4.0 * div, f"{where} loss == T^2 * divergence")
        lo, hi = bounds[rank]
        for i, (got, ref) in enumerate(zip(res["grads"], refs)):
            if case.get("replicate") or (case.get("fused") and i == 0):
                sl = (slice(None),) * ref.dim()          # replicated: the full gradient
            elif case.get("fused"):
                sl = (slice(lo, hi),)                    # Shard(0) weight rows
            else:
                sl = (slice(None), slice(lo, hi))        # Shard(-1) logits columns
            assert_rel(got, ref[sl], f"{where} grad {i} vs oracle")


def _placements_like(world, shard_dim):
    """Placement names the world's mesh gives Shard(shard_dim) (world 3: a 2-D mesh)."""
    from torch.distributed.tensor import Replicate, Shard
    return ([Replicate(), Shard(shard_dim)] if world == 3 else [Shard(shard_dim)])


# --- bad placements and layouts: every rank must raise the same error -------------------------

ERRORS = ("shard0-logits", "partial-logits", "plain-teacher", "mismatched-teacher",
          "backend", "weight-shard1", "plain-hidden", "plain-teacher-hidden")
ERROR_WORD = {"shard0-logits": "student_logits", "partial-logits": "student_logits",
              "plain-teacher": "teacher_logits", "mismatched-teacher": "teacher_logits",
              "backend": "backend", "weight-shard1": "student_weight",
              "plain-hidden": "student_hidden", "plain-teacher-hidden": "teacher_hidden"}
# The ambiguity message (one plain hidden state, one DTensor) names both ways out (tensor
# parallel, FSDP2 data parallel); two plain ones are data parallel (tests/test_fsdp2.py).
ERROR_ALSO = {"plain-hidden": ("Replicate()", "FSDP2"),
              "plain-teacher-hidden": ("Replicate()", "FSDP2")}


def run_error(mesh, world, which):
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    s, t, y, _ = _inputs(world)
    shard = _placements(mesh, -1)
    sd, td = distribute_tensor(s, mesh, shard), distribute_tensor(t, mesh, shard)
    try:
        if which == "shard0-logits":
            fastkd.distillation_loss(distribute_tensor(s, mesh, _placements(mesh, 0)), td, y)
        elif which == "partial-logits":
            partial = DTensor.from_local(s, mesh, [Replicate()] * (mesh.ndim - 1) + [Partial()],
                                         run_check=False)
            fastkd.distillation_loss(partial, td, y)
        elif which == "plain-teacher":
            fastkd.distillation_loss(sd, t, y)
        elif which == "mismatched-teacher":
            fastkd.distillation_loss(sd, distribute_tensor(t, mesh, [Replicate()] * mesh.ndim),
                                     y)
        elif which == "backend":
            fastkd.distillation_loss(sd, td, y, backend="cpu")
        elif which in ("plain-hidden", "plain-teacher-hidden"):
            hs, ws, ht, wt, _ = _fused_inputs(world)
            # One plain hidden state and one Replicate() DTensor: no proof either way.
            student_hidden = hs if which == "plain-hidden" else _replicated(hs, mesh)
            teacher_hidden = _replicated(ht, mesh) if which == "plain-hidden" else ht
            fastkd.fused_linear_distillation_loss(
                student_hidden, distribute_tensor(ws, mesh, _placements(mesh, 0)),
                teacher_hidden,
                distribute_tensor(wt, mesh, _placements(mesh, 0)), y)
        else:
            hs, ws, ht, wt, _ = _fused_inputs(world)
            fastkd.fused_linear_distillation_loss(
                hs, distribute_tensor(ws, mesh, _placements(mesh, 1)), ht,
                distribute_tensor(wt, mesh, _placements(mesh, 1)), y)
    except (TypeError, ValueError) as exc:
        return dict(error=f"{type(exc).__name__}: {exc}")
    return dict(error=None)


def run_dtensor_cases(rank, world, mesh) -> dict:
    out = {c["name"]: run_dtensor(rank, world, mesh, c) for c in DTENSOR}
    out.update({f"error-{w}": run_error(mesh, world, w) for w in ERRORS})
    return out


def check_dtensor_cases(world, per_rank) -> None:
    for case in DTENSOR:
        check_dtensor(world, case, [r[case["name"]] for r in per_rank])
    for which in ERRORS:
        messages = [r[f"error-{which}"]["error"] for r in per_rank]
        assert all(m is not None for m in messages), f"{which}: a rank did not raise"
        assert all(m == messages[0] and ERROR_WORD[which] in m for m in messages), messages
        assert all(word in messages[0] for word in ERROR_ALSO.get(which, ())), messages[0]
