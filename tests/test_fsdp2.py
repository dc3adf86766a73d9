"""The fused lm-head loss under FSDP2 (`fully_shard`) on 2 gloo ranks (CPU).

Each rank has its own tokens (data parallel). The student's and the teacher's bodies and
heads are `fully_shard`-ed, so outside the head's forward both head weights are DTensors
`Shard(0)`, and the hidden states are plain tensors: fastkd must take that as data parallel,
gather the weights and return each rank its own loss, with the head's gradient reduce-scattered
as FSDP2 does for the unfused head. Checked against (a) the unfused head under the same
`fully_shard` setup and (b) one process computing each rank's loss on the full parameters
(gradients: the mean over ranks, FSDP2's rule).
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import random_logits, random_target

import fastkd

WORLD = 2
ROWS, H_IN, H_S, H_T, VOCAB = 7, 6, 8, 5, 21  # 21 rows: uneven torch.chunk shards 11 + 10
KW = dict(divergence="jsd", temperature=2.0, alpha=0.3)


def _models():
    torch.manual_seed(0)
    student = torch.nn.ModuleDict(dict(body=torch.nn.Linear(H_IN, H_S),
                                       head=torch.nn.Linear(H_S, VOCAB, bias=False)))
    teacher = torch.nn.ModuleDict(dict(body=torch.nn.Linear(H_IN, H_T),
                                       head=torch.nn.Linear(H_T, VOCAB)))
    teacher.requires_grad_(False)
    return student, teacher


def _batch(rank):
    x = random_logits(ROWS, H_IN, scale=1.0, seed=100 + rank)
    y = random_target(ROWS, vocab=VOCAB, ignore_fraction=0.3, seed=200 + rank)
    return x, y


def _fused(student, teacher, x, y, **extra):
    h, ht = torch.tanh(student["body"](x)), torch.tanh(teacher["body"](x))
    return fastkd.fused_linear_distillation_loss(
        h, student["head"].weight, ht, teacher["head"].weight, y,
        teacher_bias=teacher["head"].bias, chunk_size=3, **KW, **extra)


def _unfused(student, teacher, x, y):
    logits = student["head"](torch.tanh(student["body"](x)))
    with torch.no_grad():
        t_logits = teacher["head"](torch.tanh(teacher["body"](x)))
    return fastkd.distillation_loss(logits, t_logits, y, **KW)


def _topk(teacher, x, k=5):
    with torch.no_grad():
        t_logits = teacher["head"](torch.tanh(teacher["body"](x)))
    return torch.log_softmax(t_logits / KW["temperature"], -1).topk(k)


TOPK_KW = dict(temperature=2.0, alpha=0.3, tail="renormalize")


def _topk_fused(student, teacher, x, y):
    lp, idx = _topk(teacher, x)
    return fastkd.fused_linear_sparse_distillation_loss(
        torch.tanh(student["body"](x)), student["head"].weight, lp, idx, y, chunk_size=3,
        **TOPK_KW)


def _topk_unfused(student, teacher, x, y):
    lp, idx = _topk(teacher, x)
    logits = student["head"](torch.tanh(student["body"](x)))
    return fastkd.sparse_distillation_loss(logits, lp, idx, y, **TOPK_KW)


def _sharded(mesh):
    from torch.distributed.fsdp import fully_shard
    student, teacher = _models()
    for model in (student, teacher):
        for part in model.values():
            fully_shard(part, mesh=mesh)  # each part its own root, as in "head outside"
    return student, teacher


def _grads(model):
    return {name: p.grad.full_tensor() for name, p in model.named_parameters()}


def _errors(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return str(exc)
    return "no error"


def _worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        x, y = _batch(rank)
        out = {}
        student, teacher = _sharded(mesh)
        placements = tuple(map(str, student["head"].weight.placements))
        loss = _fused(student, teacher, x, y)
        loss.backward()
        out["fused"] = dict(loss=loss.detach(), grads=_grads(student), placements=placements,
                            grad_placements=tuple(map(str, student["head"].weight.grad.placements)),
                            plain=not isinstance(loss, DTensor))
        student, teacher = _sharded(mesh)
        loss = _unfused(student, teacher, x, y)
        loss.backward()
        out["unfused"] = dict(loss=loss.detach(), grads=_grads(student))
        for name, loss_fn in (("topk_fused", _topk_fused), ("topk_unfused", _topk_unfused)):
            student, teacher = _sharded(mesh)
            loss = loss_fn(student, teacher, x, y)
            loss.backward()
            out[name] = dict(loss=loss.detach(), grads=_grads(student))
        # Shard(-1) DTensor logits (the same on both ranks) with a top-k teacher: the
        # vocab-parallel top-k loss.
        from torch.distributed.tensor import Shard, distribute_tensor
        s_full, t_full = random_logits(ROWS, VOCAB, seed=300), random_logits(ROWS, VOCAB, seed=301)
        lp, idx = torch.log_softmax(t_full / 2.0, -1).topk(5)
        sd = distribute_tensor(s_full, mesh, [Shard(1)]).requires_grad_(True)
        loss = fastkd.sparse_distillation_loss(sd, lp, idx, _batch(0)[1], **TOPK_KW)
        loss.backward()
        out["topk_logits"] = dict(loss=loss.to_local().detach(), grad=sd.grad.full_tensor())
        # The same tokens on both ranks with tensor_parallel=True: the vocab-parallel loss.
        x0, y0 = _batch(0)
        student, teacher = _sharded(mesh)
        out["tp"] = _fused(student, teacher, x0, y0, tensor_parallel=True).to_local().detach()
        # Contradicting or mixed proofs raise.
        h = torch.tanh(student["body"](x)).detach()
        ht = torch.tanh(teacher["body"](x)).detach()
        rep = [Replicate()]
        out["mixed"] = _errors(lambda: fastkd.fused_linear_distillation_loss(
            DTensor.from_local(h, mesh, rep), student["head"].weight, ht,
            teacher["head"].weight, y))
        out["contradiction"] = _errors(lambda: fastkd.fused_linear_distillation_loss(
            DTensor.from_local(h, mesh, rep), student["head"].weight,
            DTensor.from_local(ht, mesh, rep), teacher["head"].weight, y,
            tensor_parallel=False))
        lp, idx = _topk(teacher, x)
        out["topk_tp"] = _errors(lambda: fastkd.fused_linear_sparse_distillation_loss(
            h, student["head"].weight, lp, idx, y, tensor_parallel=True))
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _one_process():
    """Each rank's loss on the full parameters, and the mean of their gradients."""
    losses, grads = [], []
    for rank in range(WORLD):
        student, teacher = _models()
        loss = _unfused(student, teacher, *_batch(rank))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in student.named_parameters()})
    mean = {n: sum(g[n] for g in grads) / WORLD for n in grads[0]}
    return losses, mean


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=what)


def test_fsdp2_sharded_head_is_data_parallel(results):
    losses, mean_grads = _one_process()
    assert losses[0] != losses[1]  # the ranks' tokens differ: a shared loss would be wrong
    for rank, res in enumerate(results):
        fused, unfused = res["fused"], res["unfused"]
        assert fused["placements"] == fused["grad_placements"]
        assert fused["placements"] == ("S(0)",), fused["placements"]
        assert fused["plain"], "data parallel returns the rank's own loss as a plain tensor"
        _close(fused["loss"], losses[rank], f"rank {rank} loss vs one process")
        _close(fused["loss"], unfused["loss"], f"rank {rank} loss vs unfused FSDP2")
        for name, grad in fused["grads"].items():
            _close(grad, unfused["grads"][name], f"rank {rank} {name} vs unfused FSDP2")
            _close(grad, mean_grads[name], f"rank {rank} {name} vs mean of one-process")


def test_fsdp2_sharded_head_top_k_teacher(results):
    losses, grads = [], []
    for rank in range(WORLD):
        student, teacher = _models()
        loss = _topk_unfused(student, teacher, *_batch(rank))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in student.named_parameters()})
    for rank, res in enumerate(results):
        fused, unfused = res["topk_fused"], res["topk_unfused"]
        _close(fused["loss"], losses[rank], f"rank {rank} top-k loss vs one process")
        _close(fused["loss"], unfused["loss"], f"rank {rank} top-k loss vs unfused FSDP2")
        for name, grad in fused["grads"].items():
            _close(grad, unfused["grads"][name], f"rank {rank} top-k {name} vs unfused")
            _close(grad, sum(g[name] for g in grads) / WORLD, f"rank {rank} top-k {name}")


def test_shard_last_dim_logits_with_top_k_teacher_are_vocab_parallel(results):
    s_full = random_logits(ROWS, VOCAB, seed=300).requires_grad_(True)
    lp, idx = torch.log_softmax(random_logits(ROWS, VOCAB, seed=301) / 2.0, -1).topk(5)
    loss = fastkd.sparse_distillation_loss(s_full, lp, idx, _batch(0)[1], **TOPK_KW)
    loss.backward()
    for res in results:
        _close(res["topk_logits"]["loss"], loss.detach(), "Shard(-1) top-k loss")
        _close(res["topk_logits"]["grad"], s_full.grad, "Shard(-1) top-k gradient")


def test_tensor_parallel_true_takes_plain_hidden_as_replicated(results):
    student, teacher = _models()
    expected = _fused(student, teacher, *_batch(0)).detach()
    for res in results:
        _close(res["tp"], expected, "tensor_parallel=True loss")


def test_mixed_or_contradicting_proofs_raise_naming_both_ways_out(results):
    for res in results:
        assert "one of each" in res["mixed"] and "tensor_parallel=True" in res["mixed"]
        assert "contradicts" in res["contradiction"] and "FSDP2" in res["contradiction"]
        assert "no vocab-parallel form" in res["topk_tp"], res["topk_tp"]


def test_tensor_parallel_needs_dtensor_weights():
    student, teacher = _models()
    x, y = _batch(0)
    with pytest.raises(ValueError, match="tensor_parallel"):
        _fused(copy.deepcopy(student), teacher, x, y, tensor_parallel=True)
