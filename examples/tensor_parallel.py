"""Tensor-parallel distillation of a tiny Llama with fastkd (CPU, gloo, no download).

    torchrun --nproc-per-node 2 examples/tensor_parallel.py            # logits (DTensor)
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --fused    # fused lm-head

A student and a teacher Llama are built from configs (random weights, the same on every
rank). Their `lm_head`s are split over the vocabulary with
`parallelize_module(..., ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))`,
so each rank computes only its vocabulary slice of the logits, as a DTensor. fastkd sees
the DTensor and runs the vocab-parallel loss: only per-row statistics cross ranks, never
the logits. With --fused the logits are not even formed: the loss takes the hidden states
(as Replicate() DTensors: the proof that every rank holds the same tokens) and the sharded
head weights (DTensors Shard(0)) and computes the logits chunk by chunk.

Every rank also trains an unsharded copy of the same models on the same batches with the
single-process loss; the script prints both losses per step and checks they agree.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

import fastkd

VOCAB, SEQ, BATCH = 1001, 16, 4  # an odd vocabulary: the shards are uneven (501 + 500)


def build(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def distil_loss(student, teacher, input_ids, fused: bool, keywords: dict):
    """Next-token distillation loss of a batch (logits of position i predict token i + 1)."""
    labels = input_ids[:, 1:]
    if fused:
        h_s = student.model(input_ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            h_t = teacher.model(input_ids).last_hidden_state[:, :-1]
        weight = student.lm_head.weight
        if isinstance(weight, DTensor):
            # Replicate() hidden states say "tensor parallel": a plain tensor beside a Shard(0)
            # weight could equally be FSDP2's per-rank batch, and fastkd does not guess.
            h_s = DTensor.from_local(h_s, weight.device_mesh, [Replicate()], run_check=False)
            h_t = DTensor.from_local(h_t, weight.device_mesh, [Replicate()], run_check=False)
        return fastkd.fused_linear_distillation_loss(
            h_s, weight, h_t, teacher.lm_head.weight, labels, **keywords)
    s_logits = student(input_ids).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids).logits[:, :-1]
    return fastkd.distillation_loss(s_logits, t_logits, labels, **keywords)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fused", action="store_true", help="fused lm-head loss")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))

    student, teacher = build(32, 2, seed=0), build(48, 3, seed=1)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    vocab_parallel = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(student, mesh, {"lm_head": vocab_parallel})
    parallelize_module(teacher, mesh, {"lm_head": vocab_parallel})
    if rank == 0:
        local = student.lm_head.weight.to_local().shape
        print(f"{world} ranks; student lm_head weight {tuple(student.lm_head.weight.shape)} "
              f"-> local shard {tuple(local)} on rank 0; fused={args.fused}")

    keywords = dict(temperature=2.0, alpha=0.5, divergence="kl")
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref_student.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(2)
    worst = 0.0
    for step in range(args.steps):
        input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=data)
        loss = distil_loss(student, teacher, input_ids, args.fused, keywords)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref = distil_loss(ref_student, ref_teacher, input_ids, args.fused, keywords)
        ref_opt.zero_grad()
        ref.backward()
        ref_opt.step()
        value = loss.full_tensor().item()  # a DTensor replicated on the mesh
        rel = abs(value - ref.item()) / abs(ref.item())
        worst = max(worst, rel)
        if rank == 0:
            print(f"step {step}: tensor-parallel loss {value:.7f}   single-process "
                  f"{ref.item():.7f}   relative difference {rel:.1e}")
    # fp32 parameters updated from gradients that agree to rounding: the runs stay together.
    assert worst < 1e-5, f"tensor-parallel and single-process losses differ by {worst:.2e}"
    if rank == 0:
        print(f"OK: the losses agree within {worst:.1e} over {args.steps} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
