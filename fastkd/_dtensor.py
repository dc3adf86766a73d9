"""DTensor routing: vocabulary-sharded DTensors go to the vocab-parallel losses.

`fastkd.distillation_loss` and `fastkd.fused_linear_distillation_loss` hand a call with a
DTensor argument to `dtensor_distillation_loss` / `dtensor_fused_linear_distillation_loss`
here. This module imports the public functions and registers these two routes with
`fastkd._dispatch` when `fastkd` is imported; nothing imports it back.

Accepted layouts, on a device mesh of any number of dimensions:
- logits: `Shard(-1)` (the vocabulary) on exactly one mesh dimension and `Replicate()` on the
  others; student and teacher with the same mesh and placements. The loss runs over that
  mesh dimension's process group. All-`Replicate()` DTensors are computed like local tensors.
- fused lm-head: head weights (and biases) `Shard(0)` on one mesh dimension (what
  `ColwiseParallel` makes of an `nn.Linear`), `Replicate()` elsewhere, with hidden states that
  are all-`Replicate()` DTensors on the same mesh: those prove the tokens are the same on every
  rank (tensor parallel). FSDP2's `fully_shard` leaves the same `Shard(0)` weight with plain,
  per-rank hidden states (data parallel), so a sharded weight with a plain hidden state is
  ambiguous and raises a `ValueError` naming both ways out; fastkd never guesses. With
  all-`Replicate()` weights the hidden states may be plain tensors.
Anything else (`Partial`, a shard of another dimension) raises naming the argument. The loss
(and the components) come back as DTensors replicated on the mesh; the gradients as DTensors
with their inputs' placements (`to_local` / `from_local` carry them).

`torch.distributed.tensor` is imported only here, when a DTensor already exists:
`import fastkd` stays light.
"""

from __future__ import annotations

from . import distributed, functional
from ._dispatch import register_dtensor_route


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


def _proven_replicated(name: str, hidden, mesh):
    """The local tensor of hidden states that prove tensor parallelism for a Shard(0) head:
    an all-Replicate DTensor on the head's mesh. A plain tensor is what FSDP2 (data parallel,
    each rank its own tokens) passes too, so it raises instead of being taken for either."""
    dt = _dt()
    if not isinstance(hidden, dt.DTensor):
        raise ValueError(
            f"{name} is a plain tensor while the head weights are DTensors sharded Shard(0): "
            "that is both FSDP2's data-parallel layout (each rank its own tokens) and "
            "ColwiseParallel's tensor-parallel one (the same tokens on every rank), and fastkd "
            "does not guess. Tensor parallel: pass the hidden states as DTensors with "
            "Replicate() placements on the weights' mesh (DTensor.from_local(hidden, mesh, "
            "[Replicate()] * mesh.ndim)). Data parallel (FSDP2): call the loss on unsharded "
            "logits (fastkd.distillation_loss on lm_head(hidden) inside the model's forward), "
            "since the fused lm-head loss does not gather FSDP2-sharded weights yet")
    if hidden.device_mesh != mesh:
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


def dtensor_fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden,
                                           teacher_weight, target=None, *, student_bias=None,
                                           teacher_bias=None, backend: str = "auto",
                                           **keywords):
    """`fastkd.fused_linear_distillation_loss` for DTensor lm-head weights.

    Parameters
    ----------
    student_hidden, teacher_hidden : all-Replicate DTensor (..., Hs) / (..., Ht)
        On the weights' mesh when the weights are sharded (the proof of tensor parallelism:
        a plain tensor raises, see the module docstring); a plain tensor or an all-Replicate
        DTensor when the weights are all Replicate.
    student_weight, teacher_weight : DTensor (V, Hs) / (V, Ht)
        Shard(0) on one mesh dimension (Replicate elsewhere), the same mesh and placements
        for both (as `ColwiseParallel` leaves an lm-head); or all Replicate.
    student_bias, teacher_bias : DTensor (V,) with the weights' placements, or None
    target : Tensor or all-Replicate DTensor (...) of integer labels, or None
    **keywords
        Those of `fastkd.fused_linear_distillation_loss` (chunk_size, return_components...).

    Returns
    -------
    DTensor
        The loss replicated on the mesh, or (loss, ce, divergence). Backward: the weight and
        bias gradients as DTensors with their placements, the FULL hidden-state gradient on
        every rank (summed over the vocabulary-parallel group).
    """
    dt = _dt()

    y = _local_replicated("target", target)
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
    h_s = _proven_replicated("student_hidden", student_hidden, mesh)
    h_t = _proven_replicated("teacher_hidden", teacher_hidden, mesh)
    _check_backend(backend)
    start = _local_slice("student_weight", student_weight, mesh_dim, 0)
    result = distributed.vocab_parallel_fused_linear_distillation_loss(
        h_s, student_weight.to_local(), h_t, teacher_weight.to_local(), y,
        vocab_start_index=start, group=mesh.get_group(mesh_dim),
        student_bias_shard=local(student_bias), teacher_bias_shard=local(teacher_bias),
        **keywords)
    return _replicated_out(result, mesh)


register_dtensor_route("logits", dtensor_distillation_loss)
register_dtensor_route("fused_linear", dtensor_fused_linear_distillation_loss)
