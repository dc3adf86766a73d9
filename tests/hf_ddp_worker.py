"""One rank of the 2-process data-parallel check (run by tests/test_hf_ddp.py via torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp_worker.py OUT.pt B
    python tests/hf_ddp_worker.py OUT.pt B           (one process)

Trains one SGD step of a tiny Llama student from a tiny Llama teacher on 4 examples with a
per-process batch of B and writes, from rank 0, the parameter change and the logged loss.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_models import collate, examples, llama  # noqa: E402

from fastkd.integrations.transformers import (  # noqa: E402
    DistillationArguments,
    DistillationTrainer,
)


def run(out_dir: str, batch_size: int) -> dict:
    student, teacher = llama(seed=0), llama(hidden=48, seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = DistillationArguments(
        output_dir=out_dir, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, seed=7,
        max_steps=1, per_device_train_batch_size=batch_size,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        temperature=2.0, alpha=0.3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=examples(4), data_collator=collate)
    trainer.train()
    step = {n: before[n] - p.detach() for n, p in student.named_parameters()}
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {"step": step, "log": logs[0], "world": trainer.args.world_size}


if __name__ == "__main__":
    result = run(os.path.dirname(sys.argv[1]), int(sys.argv[2]))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, sys.argv[1])
