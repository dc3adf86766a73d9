"""Row shards of a data-parallel (FSDP2) parameter gathered for one call, gradients
reduce-scattered back with FSDP2's semantics.

FSDP2 (`fully_shard`) keeps each parameter as `torch.chunk(full, world)[rank]` along dim 0
(uneven: the last chunks may be shorter or empty). Forward: one `all_gather_into_tensor` of
the shards padded to `ceil(V / world)` rows, trimmed to the (V, ...) parameter: the only full
copy of it this call makes. Backward: the full gradient, padded the same way, is
`reduce_scatter_tensor`-summed and divided by the world size, which is what FSDP2's own
reduce-scatter gives an unfused module's sharded parameter (the mean over the data-parallel
ranks of their gradients). Bytes moved per call: (world - 1) / world * V * H * itemsize in
each direction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard_rows(full_rows: int, world: int) -> list:
    """Rows of each rank's `torch.chunk` shard of `full_rows` rows over `world` ranks."""
    per = -(-full_rows // world)  # ceil
    return [max(0, min(full_rows, (r + 1) * per) - min(full_rows, r * per))
            for r in range(world)]


def _padded(local: torch.Tensor, rows: int) -> torch.Tensor:
    if local.shape[0] == rows:
        return local.contiguous()
    pad = local.new_zeros((rows - local.shape[0],) + tuple(local.shape[1:]))
    return torch.cat([local, pad])


class GatherRows(torch.autograd.Function):
    """(V_local, ...) shard -> (V, ...) full tensor; backward: mean-reduce-scatter."""

    @staticmethod
    def forward(ctx, local, full_rows: int, group):
        world = dist.get_world_size(group)
        per = -(-full_rows // world)
        out = local.new_empty((world * per,) + tuple(local.shape[1:]))
        dist.all_gather_into_tensor(out, _padded(local, per), group=group)
        ctx.setup = (full_rows, group, local.shape[0])
        return out[:full_rows]

    @staticmethod
    def backward(ctx, grad_full):
        full_rows, group, local_rows = ctx.setup
        world = dist.get_world_size(group)
        per = -(-full_rows // world)
        grad_full = _padded(grad_full, world * per)
        grad_local = grad_full.new_empty((per,) + tuple(grad_full.shape[1:]))
        dist.reduce_scatter_tensor(grad_local, grad_full, group=group)
        return grad_local[:local_rows].div_(world), None, None


def gather_rows(local: torch.Tensor, full_rows: int, group) -> torch.Tensor:
    """The full (full_rows, ...) tensor from every rank's torch.chunk row shard `local`
    (differentiable: the gradient returns as the mean over the group, FSDP2's rule)."""
    expected = shard_rows(full_rows, dist.get_world_size(group))[dist.get_rank(group)]
    if local.shape[0] != expected:
        raise ValueError(f"local shard of {local.shape[0]} rows does not match the torch.chunk "
                         f"split of {full_rows} rows ({expected} expected on this rank)")
    return GatherRows.apply(local, full_rows, group)
