"""DTensor routing: vocabulary-sharded DTensors go to the vocab-parallel losses.

`fastkd.distillation_loss` and `fastkd.fused_linear_distillation_loss` hand a call with a
DTensor argument to `dtensor_distillation_loss` / `dtensor_fused_linear_distillation_loss`
here. This module imports the public functions and registers these two routes with
`fastkd._dispatch` when `fastkd` is imported; nothing imports it back.

Accepted layouts, on a device mesh of any number of dimensions:
- logits: `Shard(-1)` (the vocabulary) on exactly one mesh dimension and `Replicate()` on the
  others; student and teacher with the same mesh and placements. The loss runs over that
  mesh dimension's process group. All-`Replicate()` DTensors are computed like local tensors.
- fused lm-head: a head weight `Shard(0)` on one mesh dimension is what both FSDP2's
  `fully_shard` (data parallel: each rank its own tokens) and `ColwiseParallel` (tensor
  parallel: the same tokens on every rank) leave; the hidden states decide, never a guess.
  Plain hidden states mean data parallel: each sharded weight (student, teacher, or both) is
  gathered for the call (`fastkd.ops.shard_gather`; the gradient is reduce-scattered and
  averaged as FSDP2 does) and the rank's own loss comes back as a plain tensor.
  All-`Replicate()` DTensor hidden states on the weights' mesh (or plain ones with
  `tensor_parallel=True`) mean tensor parallel: the vocab-parallel loss. Mixed or
  contradicting proofs raise a `ValueError` naming both ways out.
- top-k: `sparse_distillation_loss` with `Shard(-1)` student logits runs the vocab-parallel
  top-k loss; `fused_linear_sparse_distillation_loss` with a `Shard(0)` weight and plain
  hidden states is data parallel (gathered, as above); its tensor-parallel form raises.
Anything else (`Partial`, a shard of another dimension) raises naming the argument. The loss
(and the components) come back as DTensors replicated on the mesh; the gradients as DTensors
with their inputs' placements (`to_local` / `from_local` carry them).

`torch.distributed.tensor` is imported only here, when a DTensor already exists:
`import fastkd` stays light.
"""

from __future__ import annotations

import torch

from . import distributed, functional
from ._dispatch import register_dtensor_route
from .ops.shard_gather import gather_rows


def _dt():
    import torch.distributed.tensor as dt
    return dt


def _layout(name: str, tensor, shard_dim: int):
    """(mesh, sharded mesh dimension or None) of a DTensor whose placements are Replicate
    except at most one Shard(shard_dim) (negative dims count from the end)."""
    sharded = None
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if placement.is_shard() and placement.dim % tensor.ndim == shard_dim % tensor.ndim:
            if sharded is not None:
                raise ValueError(f"{name}: sharded on more than one mesh dimension "
                                 f"({tensor.placements}); shard it on one mesh dimension")
            sharded = mesh_dim
            continue
        want = "Shard(-1)" if shard_dim == -1 else f"Shard({shard_dim})"
        raise ValueError(f"{name} has placements {tuple(tensor.placements)}; fastkd takes a "
                         f"DTensor with {want} on one mesh dimension and Replicate() on the "
                         "others (redistribute it first, e.g. a Partial to Replicate())")
    return tensor.device_mesh, sharded


def _local_slice(name: str, tensor, mesh_dim: int, dim: int) -> int:
    """Global start of this rank's shard along `dim` (torch.chunk layout, uneven included),
    checked against the local shard's size."""
    mesh = tensor.device_mesh
    size, parts = tensor.shape[dim], mesh.size(mesh_dim)
    coordinate = mesh.get_coordinate()[mesh_dim]
    full = -(-size // parts)  # ceil
    start = min(coordinate * full, size)
    expected = max(0, min(size, start + full) - start)
    if tensor.to_local().shape[dim] != expected:
        raise ValueError(f"{name}: local shard of {tensor.to_local().shape[dim]} rows/columns "
                         f"on mesh coordinate {coordinate} does not match the even "
                         f"(torch.chunk) split of {size} into {parts} ({expected} expected)")
    return start


def _same_layout(name: str, tensor, reference_name: str, reference) -> None:
    dt = _dt()
    if not isinstance(tensor, dt.DTensor):
        raise TypeError(f"{name} must be a DTensor on the same mesh and placements as "
                        f"{reference_name} (a sharded DTensor), got {type(tensor).__name__}")
    if tensor.device_mesh != reference.device_mesh or \
            tuple(tensor.placements) != tuple(reference.placements):
        raise ValueError(f"{name} has mesh {tensor.device_mesh} and placements "
                         f"{tuple(tensor.placements)}; they must equal {reference_name}'s "
                         f"({reference.device_mesh}, {tuple(reference.placements)})")


def _local_replicated(name: str, tensor):
    """A plain tensor, or the local tensor of an all-Replicate DTensor (differentiable)."""
    dt = _dt()
    if tensor is None or not isinstance(tensor, dt.DTensor):
        return tensor
    if not all(p.is_replicate() for p in tensor.placements):
        raise ValueError(f"{name} has placements {tuple(tensor.placements)}; it must be a "
                         "plain tensor or a DTensor with Replicate() placements")
    return tensor.to_local()


def _replicated_hidden(name: str, hidden, mesh):
    """The local tensor of tensor-parallel hidden states: a plain tensor (the caller said
    tensor_parallel=True) or an all-Replicate DTensor on the head's mesh."""
    if isinstance(hidden, _dt().DTensor) and hidden.device_mesh != mesh:
        raise ValueError(f"{name} is a DTensor on mesh {hidden.device_mesh}; it must be on the "
                         f"head weights' mesh ({mesh})")
    return _local_replicated(name, hidden)


def _replicated_out(result, mesh):
    dt = _dt()
    placements = [dt.Replicate()] * mesh.ndim

    def wrap(x):
        return dt.DTensor.from_local(x, mesh, placements, run_check=False)

    return tuple(map(wrap, result)) if isinstance(result, tuple) else wrap(result)


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend={backend!r}: vocabulary-sharded DTensors run the "
                         "vocab-parallel reference kernels; use backend='auto' or 'torch'")


def dtensor_distillation_loss(student_logits, teacher_logits, target=None, *,
                              backend: str = "auto", **keywords):
    """`fastkd.distillation_loss` for DTensor logits (see the module docstring).

    Parameters
    ----------
    student_logits, teacher_logits : DTensor (..., V)
        Shard(-1) on one mesh dimension (Replicate elsewhere), the same mesh and placements
        for both; or Replicate() everywhere (then either may also be a plain tensor).
    target : Tensor or all-Replicate DTensor (...) of integer labels, or None
    backend : str
        "auto" or "torch" for sharded logits; any backend for replicated ones.
    **keywords
        Those of `fastkd.distillation_loss` (inplace_backward, return_components included).

    Returns
    -------
    DTensor
        The loss replicated on the mesh (equal to the single-process loss), or
        (loss, ce, divergence) with return_components=True; the gradients arrive as DTensors
        with the logits' placements.
    """
    dt = _dt()

    y = _local_replicated("target", target)
    s_sharded = isinstance(student_logits, dt.DTensor) and \
        _layout("student_logits", student_logits, -1)[1] is not None
    t_sharded = isinstance(teacher_logits, dt.DTensor) and \
        _layout("teacher_logits", teacher_logits, -1)[1] is not None
    if not (s_sharded or t_sharded):
        mesh = (student_logits if isinstance(student_logits, dt.DTensor)
                else teacher_logits).device_mesh
        result = functional.distillation_loss(
            _local_replicated("student_logits", student_logits),
            _local_replicated("teacher_logits", teacher_logits), y, backend=backend,
            **keywords)
        return _replicated_out(result, mesh)
    if s_sharded:
        _same_layout("teacher_logits", teacher_logits, "student_logits", student_logits)
    else:
        _same_layout("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_backend(backend)
    mesh, mesh_dim = _layout("student_logits", student_logits, -1)
    start = _local_slice("student_logits", student_logits, mesh_dim, -1)
    result = distributed.vocab_parallel_distillation_loss(
        student_logits.to_local(), teacher_logits.to_local(), y, vocab_start_index=start,
        group=mesh.get_group(mesh_dim), **keywords)
    return _replicated_out(result, mesh)


def _data_parallel_head(name: str, weight, bias):
    """A head for this rank's own tokens: a plain weight as it is, an all-Replicate DTensor
    as its local tensor, a Shard(0) DTensor (FSDP2) gathered over its mesh dimension for
    this call (`fastkd.ops.shard_gather`: the gradient comes back FSDP2's way)."""
    dt = _dt()
    if not isinstance(weight, dt.DTensor):
        if isinstance(bias, dt.DTensor):
            raise TypeError(f"{name}_bias is a DTensor but {name}_weight is not")
        return weight, bias
    mesh, mesh_dim = _layout(f"{name}_weight", weight, 0)
    if bias is not None:
        _same_layout(f"{name}_bias", bias, f"{name}_weight", weight)
    if mesh_dim is None:
        return weight.to_local(), None if bias is None else bias.to_local()
    _local_slice(f"{name}_weight", weight, mesh_dim, 0)
    group = mesh.get_group(mesh_dim)
    full = gather_rows(weight.to_local(), weight.shape[0], group)
    return full, None if bias is None else gather_rows(bias.to_local(), bias.shape[0], group)


def _ways_out(what: str) -> str:
    return (f"{what}. Data parallel (FSDP2, each rank its own tokens): pass plain hidden "
            "states (tensor_parallel=None or False). Tensor parallel (the same tokens on "
            "every rank): pass the hidden states as DTensors with Replicate() placements on "
            "the weights' mesh, or plain ones with tensor_parallel=True")


def _parallelism(student_hidden, teacher_hidden, tensor_parallel) -> str:
    """"data" or "tensor", from what the caller proves (see the module docstring)."""
    dt = _dt()
    if tensor_parallel not in (None, True, False):
        raise TypeError(f"tensor_parallel must be None, True or False, got {tensor_parallel!r}")
    dtensors = [isinstance(h, dt.DTensor) for h in (student_hidden, teacher_hidden)]
    if dtensors[0] != dtensors[1]:
        raise ValueError(_ways_out("student_hidden and teacher_hidden must both be plain "
                                   "tensors or both DTensors, got one of each"))
    if dtensors[0]:
        if tensor_parallel is False:
            raise ValueError(_ways_out("tensor_parallel=False (data parallel) contradicts "
                                       "DTensor hidden states, which say tensor parallel"))
        return "tensor"
    return "tensor" if tensor_parallel else "data"


def dtensor_fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden,
                                           teacher_weight, target=None, *, student_bias=None,
                                           teacher_bias=None, backend: str = "auto",
                                           tensor_parallel=None, **keywords):
    """`fastkd.fused_linear_distillation_loss` for DTensor lm-head weights.

    Parameters
    ----------
    student_hidden, teacher_hidden : Tensor or all-Replicate DTensor (..., Hs) / (..., Ht)
        Plain tensors: data parallel unless `tensor_parallel=True` (FSDP2: each rank its own
        tokens). All-Replicate DTensors on the weights' mesh: tensor parallel.
    student_weight, teacher_weight : Tensor or DTensor (V, Hs) / (V, Ht)
        Data parallel: each a plain tensor, an all-Replicate DTensor or a Shard(0) DTensor
        (FSDP2's sharded parameter, gathered for the call). Tensor parallel: Shard(0) on one
        mesh dimension (Replicate elsewhere), the same mesh and placements for both (as
        `ColwiseParallel` leaves an lm-head), or all Replicate.
    student_bias, teacher_bias : DTensor (V,) with the weights' placements, or None
    target : Tensor or all-Replicate DTensor (...) of integer labels, or None
    tensor_parallel : None, True or False (see `fastkd.fused_linear_distillation_loss`)
    **keywords
        Those of `fastkd.fused_linear_distillation_loss` (chunk_size, return_components...).

    Returns
    -------
    Tensor or DTensor
        Data parallel: this rank's own loss, a plain tensor (or (loss, ce, divergence));
        the gradients of sharded weights arrive as DTensors with their placements, the mean
        over the ranks as FSDP2 gives an unfused head. Tensor parallel: the loss replicated
        on the mesh; the weight and bias gradients as DTensors with their placements, the
        FULL hidden-state gradient on every rank (summed over the vocabulary-parallel group).
    """
    dt = _dt()
    y = _local_replicated("target", target)
    if _parallelism(student_hidden, teacher_hidden, tensor_parallel) == "data":
        s_w, s_b = _data_parallel_head("student", student_weight, student_bias)
        with torch.no_grad():  # the teacher is a constant (no gradient, no graph)
            t_w, t_b = _data_parallel_head("teacher", teacher_weight, teacher_bias)
        return functional.fused_linear_distillation_loss(
            student_hidden, s_w, teacher_hidden, t_w, y, student_bias=s_b, teacher_bias=t_b,
            backend=backend, **keywords)
    if not isinstance(student_weight, dt.DTensor):
        raise TypeError("student_weight must be a DTensor when teacher_weight or a hidden "
                        f"state is one, got {type(student_weight).__name__}")
    mesh, mesh_dim = _layout("student_weight", student_weight, 0)
    _same_layout("teacher_weight", teacher_weight, "student_weight", student_weight)
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None:
            _same_layout(name, bias, "student_weight", student_weight)

    def local(b):
        return None if b is None else b.to_local()

    if mesh_dim is None:
        h_s = _local_replicated("student_hidden", student_hidden)
        h_t = _local_replicated("teacher_hidden", teacher_hidden)
        result = functional.fused_linear_distillation_loss(
            h_s, student_weight.to_local(), h_t, teacher_weight.to_local(), y,
            student_bias=local(student_bias), teacher_bias=local(teacher_bias),
            backend=backend, **keywords)
        return _replicated_out(result, mesh)
    h_s = _replicated_hidden("student_hidden", student_hidden, mesh)
    h_t = _replicated_hidden("teacher_hidden", teacher_hidden, mesh)
    _check_backend(backend)
    start = _local_slice("student_weight", student_weight, mesh_dim, 0)
    result = distributed.vocab_parallel_fused_linear_distillation_loss(
        h_s, student_weight.to_local(), h_t, teacher_weight.to_local(), y,
        vocab_start_index=start, group=mesh.get_group(mesh_dim),
        student_bias_shard=local(student_bias), teacher_bias_shard=local(teacher_bias),
        **keywords)
    return _replicated_out(result, mesh)


def dtensor_sparse_distillation_loss(student_logits, teacher_topk_logprobs,
                                     teacher_topk_indices, target=None, *,
                                     backend: str = "auto", inplace_backward: bool = False,
                                     **keywords):
    """`fastkd.sparse_distillation_loss` for DTensor student logits: Shard(-1) on one mesh
    dimension (Replicate elsewhere) runs the vocab-parallel top-k loss over that dimension
    (the top-k teacher and target plain or all-Replicate, GLOBAL indices); all-Replicate
    logits are computed like local ones. Returns the loss replicated on the mesh."""
    dt = _dt()
    lp = _local_replicated("teacher_topk_logprobs", teacher_topk_logprobs)
    idx = _local_replicated("teacher_topk_indices", teacher_topk_indices)
    y = _local_replicated("target", target)
    if not isinstance(student_logits, dt.DTensor):
        return functional.sparse_distillation_loss(
            student_logits, lp, idx, y, backend=backend, inplace_backward=inplace_backward,
            **keywords)
    mesh, mesh_dim = _layout("student_logits", student_logits, -1)
    if mesh_dim is None:
        result = functional.sparse_distillation_loss(
            student_logits.to_local(), lp, idx, y, backend=backend,
            inplace_backward=inplace_backward, **keywords)
        return _replicated_out(result, mesh)
    _check_backend(backend)
    if inplace_backward:
        raise ValueError("inplace_backward=True: the vocab-parallel top-k loss of sharded "
                         "DTensor logits has no in-place form; pass inplace_backward=False")
    start = _local_slice("student_logits", student_logits, mesh_dim, -1)
    result = distributed.vocab_parallel_sparse_distillation_loss(
        student_logits.to_local(), lp, idx, y, vocab_start_index=start,
        group=mesh.get_group(mesh_dim), **keywords)
    return _replicated_out(result, mesh)


def dtensor_fused_linear_sparse_distillation_loss(student_hidden, student_weight,
                                                  teacher_topk_logprobs, teacher_topk_indices,
                                                  target=None, *, student_bias=None,
                                                  tensor_parallel=None, **keywords):
    """`fastkd.fused_linear_sparse_distillation_loss` for a DTensor head weight: data
    parallel (plain hidden states, FSDP2) gathers a Shard(0) weight for the call and returns
    the rank's own loss; tensor parallel has no fused top-k form and raises."""
    if _parallelism(student_hidden, student_hidden, tensor_parallel) == "tensor":
        raise ValueError(
            "tensor parallel (Replicate() DTensor hidden states or tensor_parallel=True): "
            "the fused lm-head top-k loss has no vocab-parallel form; compute the vocabulary-"
            "sharded logits (hidden @ weight_shard.T) and call fastkd.distributed."
            "vocab_parallel_sparse_distillation_loss, or pass plain hidden states for data "
            "parallel (FSDP2)")
    weight, bias = _data_parallel_head("student", student_weight, student_bias)
    return functional.fused_linear_sparse_distillation_loss(
        student_hidden, weight, _local_replicated("teacher_topk_logprobs", teacher_topk_logprobs),
        _local_replicated("teacher_topk_indices", teacher_topk_indices),
        _local_replicated("target", target), student_bias=bias, **keywords)


register_dtensor_route("logits", dtensor_distillation_loss)
register_dtensor_route("fused_linear", dtensor_fused_linear_distillation_loss)
register_dtensor_route("topk_logits", dtensor_sparse_distillation_loss)
register_dtensor_route("topk_fused_linear", dtensor_fused_linear_sparse_distillation_loss)
