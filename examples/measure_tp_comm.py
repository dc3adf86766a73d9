"""Bytes each rank sends per step with fastkd's vocab-parallel losses, against all-gathering
the logits (the simple way to get the exact loss under tensor parallelism).

    python examples/measure_tp_comm.py --out bench/results       # ~1 min on 2 CPU cores

Method. One gloo world of 4 CPU processes; subgroups of 2, 3 and 4 ranks run the real
losses (forward + backward) while `torch.distributed.all_gather` / `all_reduce` are wrapped
to record every collective's tensors. A rank's traffic is modelled as a ring, the usual
algorithm on NCCL and gloo: an all_gather of b bytes per rank sends (W - 1) * b per rank,
an all_reduce of b bytes sends 2 * (W - 1) / W * b. The recorded payloads are also checked
against the closed form below (exact match asserted).

fastkd's payloads depend on N (rows), W, the statistics' width c and, for the fused head,
the chunk count and H, but NOT on V: they are per-row statistics. So the runs use a small
vocabulary (64 columns per rank) and the table is valid for any V; the all-gather baseline
is computed for V = 32000 and 128256 in bf16 (student and teacher logits, each rank
receives the other ranks' [N, V/W] slices: (W - 1) * N * V / W * 2 bytes * 2 tensors; the
top-k teacher is replicated already, so its baseline gathers the student logits only).

Closed form (float32 statistics; N rows):
  dense kl / reverse_kl (T != 1, target): one all_gather of (N + 1) * 8 floats.
  dense jsd (T != 1, target): all_gather (N + 1) * 7 floats + all_reduce N * 2 floats.
  dense tvd: the same with N * 3 in the all_reduce.
  top-k teacher (k entries, T != 1, target): one all_gather of (N + 1) * (8 + k) floats.
  fused head, kl: per chunk of c rows one all_gather of (c + 1) * 8 floats, plus one
    all_reduce of the (N, H) float32 hidden gradient per step (the same all-reduce
    ColwiseParallel's own backward performs for an lm-head; not an extra cost).
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROWS = (256, 1024, 4096)
WORLDS = (2, 3, 4)
LOCAL_VOCAB, TOPK, HIDDEN, CHUNK = 64, 64, 2048, 1024
BASELINE_VOCABS = (32000, 128256)


class Recorder:
    """Wraps dist.all_gather / dist.all_reduce; logs (op, payload bytes per rank)."""

    def __init__(self):
        self.log = []
        self._orig = (dist.all_gather, dist.all_reduce)

    def __enter__(self):
        gather, reduce = self._orig

        def all_gather(outputs, tensor, *a, **k):
            self.log.append(("all_gather", tensor.numel() * tensor.element_size()))
            return gather(outputs, tensor, *a, **k)

        def all_reduce(tensor, *a, **k):
            self.log.append(("all_reduce", tensor.numel() * tensor.element_size()))
            return reduce(tensor, *a, **k)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self._orig


def ring_sent(op: str, payload: int, world: int) -> float:
    return (world - 1) * payload if op == "all_gather" else 2 * (world - 1) / world * payload


def expected_payloads(loss: str, n: int) -> list:
    """The closed form of the module docstring: [(op, bytes)] per step."""
    f = 4
    if loss == "dense-kl":
        return [("all_gather", (n + 1) * 8 * f)]
    if loss in ("dense-jsd", "dense-tvd"):
        return [("all_gather", (n + 1) * 7 * f),
                ("all_reduce", n * (2 if loss == "dense-jsd" else 3) * f)]
    if loss == "sparse-kl":
        return [("all_gather", (n + 1) * (8 + TOPK) * f)]
    chunks = [min(CHUNK, n - s) for s in range(0, n, CHUNK)]
    return [("all_gather", (c + 1) * 8 * f) for c in chunks] + \
        [("all_reduce", n * HIDDEN * f)]


def run_loss(loss: str, n: int, rank: int, group, gen):
    from fastkd.distributed import (
        vocab_parallel_distillation_loss,
        vocab_parallel_fused_linear_distillation_loss,
        vocab_parallel_sparse_distillation_loss,
    )
    world = dist.get_world_size(group)
    start = rank * LOCAL_VOCAB
    y = torch.randint(0, LOCAL_VOCAB * world, (n,), generator=gen)
    kw = dict(temperature=2.0, alpha=0.5)
    if loss.startswith("dense"):
        s = torch.randn(n, LOCAL_VOCAB, generator=gen).requires_grad_(True)
        t = torch.randn(n, LOCAL_VOCAB, generator=gen)
        out = vocab_parallel_distillation_loss(s, t, y, vocab_start_index=start, group=group,
                                               divergence=loss.split("-")[1], **kw)
    elif loss == "sparse-kl":
        s = torch.randn(n, LOCAL_VOCAB, generator=gen).requires_grad_(True)
        lp, idx = torch.randn(n, LOCAL_VOCAB * world, generator=gen).log_softmax(-1).topk(TOPK)
        out = vocab_parallel_sparse_distillation_loss(s, lp, idx, y, vocab_start_index=start,
                                                      group=group, **kw)
    else:
        h = torch.randn(n, HIDDEN, generator=gen).requires_grad_(True)
        w = torch.randn(LOCAL_VOCAB, HIDDEN, generator=gen).requires_grad_(True)
        out = vocab_parallel_fused_linear_distillation_loss(
            h, w, torch.randn(n, 16, generator=gen), torch.randn(LOCAL_VOCAB, 16, generator=gen),
            y, vocab_start_index=start, group=group, chunk_size=CHUNK, **kw)
    out.backward()


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=max(WORLDS), timeout=timedelta(seconds=120))
    groups = {w: dist.new_group(list(range(w))) for w in WORLDS}
    rows = []
    for world in WORLDS:
        if rank >= world:
            continue
        for loss in ("dense-kl", "dense-jsd", "dense-tvd", "sparse-kl", "fused-kl"):
            for n in ROWS:
                gen = torch.Generator().manual_seed(1000 * world + n + rank)
                with Recorder() as rec:
                    run_loss(loss, n, rank, groups[world], gen)
                assert rec.log == expected_payloads(loss, n), (loss, n, rec.log)
                rows.append(dict(loss=loss, ranks=world, N=n, log=rec.log))
    if rank == 0:
        torch.save(rows, out_file)
    dist.barrier()
    dist.destroy_process_group()


def table(rows) -> list:
    out = []
    for r in rows:
        world, n = r["ranks"], r["N"]
        sent = sum(ring_sent(op, b, world) for op, b in r["log"])
        payload = sum(b for _, b in r["log"])
        row = dict(loss=r["loss"], ranks=world, N=n, collectives=len(r["log"]),
                   payload_bytes=payload, sent_bytes_per_rank=int(sent))
        if r["loss"] == "fused-kl":  # the statistics alone, without the hidden all-reduce
            stats = [(op, b) for op, b in r["log"] if op == "all_gather"]
            row["sent_bytes_stats_only"] = int(sum(ring_sent(op, b, world) for op, b in stats))
        tensors = 1 if r["loss"].startswith("sparse") else 2  # top-k: student logits only
        for vocab in BASELINE_VOCABS:
            gathered = (world - 1) * n * (vocab // world) * 2 * tensors
            row[f"allgather_logits_bf16_V{vocab}"] = gathered
            row[f"ratio_V{vocab}"] = round(gathered / row.get("sent_bytes_stats_only", sent))
        out.append(row)
    return out


def _mib(b):
    return f"{b / 2**20:.3f}" if b < 2**20 else f"{b / 2**20:.1f}"


def write(rows, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[-1])  # the fused rows (last) carry every column
    with open(out / "tp-comm-bytes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)
    lines = ["# Tensor-parallel communication per rank per step (forward + backward)", "",
             "Measured by `examples/measure_tp_comm.py` (every collective recorded on gloo, "
             "ring model: all_gather sends (W-1)*b, all_reduce 2(W-1)/W*b per rank). "
             "fastkd's bytes do not depend on V; the baseline all-gathers bf16 student and "
             "teacher logit slices (the student's only for sparse-kl, k=64). fused-kl: "
             "statistics only (chunks of 1024 rows); its "
             "(N, H) float32 hidden-gradient all-reduce is ColwiseParallel's own.", "",
             "| loss | ranks | N | collectives | fastkd MiB sent | all-gather logits MiB "
             "(V=32000) | (V=128256) | ratio (V=128256) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sent = r.get("sent_bytes_stats_only", r["sent_bytes_per_rank"])
        lines.append(f"| {r['loss']} | {r['ranks']} | {r['N']} | {r['collectives']} | "
                     f"{_mib(sent)} | {_mib(r['allgather_logits_bf16_V32000'])} | "
                     f"{_mib(r['allgather_logits_bf16_V128256'])} | "
                     f"{r['ratio_V128256']:,}x |")
    (out / "tp-comm-bytes.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fastkd-bench", help="output folder (CSV + .md)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "rdv"), os.path.join(tmp, "rows.pt")),
                 nprocs=max(WORLDS), join=True)
        rows = table(torch.load(os.path.join(tmp, "rows.pt")))
    write(rows, Path(args.out))
    print((Path(args.out) / "tp-comm-bytes.md").read_text())


if __name__ == "__main__":
    main()
