"""Peak extra memory of `DistillationTrainer.compute_loss` (+ backward) against the naive path.

    python examples/hf_memory.py [--batch 8 --seq 512 --vocab 32000] [--out FILE.md]

Two tiny Llama models from configs (student 64 wide, teacher 96 wide, one layer each, vocabulary
V) and one batch of B*T tokens. Three steps, each forward + backward, measured as the peak of
the CPU allocator's running total (torch.profiler memory events) above what existed before:

- bodies: both models' forwards returning their final hidden states (logits of the last
  position only), a loss that touches every hidden state, backward. Every method pays this.
- fused: `DistillationTrainer.compute_loss` (fused lm-head loss, no [B*T, V] logits), backward.
- naive: both models' full logits (the models' own forward) and the textbook loss
  (log-softmax, KL, cross-entropy), backward.

"Extra" = a step's peak minus the bodies' peak, in units of one float32 [B*T, V] tensor.
Goal: fused extra <= 0.25.
"""

from __future__ import annotations

import argparse
import gc
import platform
import tempfile

import torch
import torch.nn.functional as F

from fastkd.bench.timing import cpu_peak_bytes  # the benchmarks' CPU peak (profiler events)


def llama(vocab: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    from fastkd.integrations.transformers import DistillationArguments, DistillationTrainer

    torch.set_num_threads(1)
    student, teacher = llama(args.vocab, 64, 0), llama(args.vocab, 96, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher,
        args=DistillationArguments(output_dir=tempfile.mkdtemp(), report_to="none",
                                   use_cpu=True, temperature=2.0, alpha=0.5))
    student.train()

    def zero():
        for p in student.parameters():
            p.grad = None

    def bodies():
        zero()
        h = student(ids, output_hidden_states=True, logits_to_keep=1,
                    use_cache=False).hidden_states[-1]
        with torch.no_grad():
            ht = teacher(ids, output_hidden_states=True, logits_to_keep=1,
                         use_cache=False).hidden_states[-1]
        ((h.float() * ht[..., :64].float()).sum() * 1e-6).backward()

    def fused():
        zero()
        trainer.compute_loss(student, batch).backward()

    def naive():
        zero()
        s = student(ids, use_cache=False).logits[:, :-1]
        with torch.no_grad():
            t = teacher(ids, use_cache=False).logits[:, :-1]
        y = ids[:, 1:]
        logp_s, logp_t = F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()
        ce = F.cross_entropy(s.reshape(-1, args.vocab), y.reshape(-1))
        (0.5 * ce + 0.5 * 4.0 * kl).backward()

    results = {}
    for name, step in (("bodies", bodies), ("fused", fused), ("naive", naive)):
        step()  # warm-up: first-call allocations, the head plans
        zero()
        gc.collect()
        results[name] = cpu_peak_bytes(step)
        zero()
    n = args.batch * args.seq
    unit = n * args.vocab * 4
    mib = 2 ** 20
    import transformers

    import fastkd

    lines = [
        f"compute_loss peak memory, B*T = {args.batch}*{args.seq} = {n} tokens, "
        f"V = {args.vocab}, float32, CPU (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, fastkd {fastkd.__version__}, {platform.machine()})",
        "",
        f"one float32 [B*T, V] tensor = {unit / mib:.0f} MiB",
        "",
        "| step | peak (MiB) | extra over bodies (MiB) | extra / [B*T, V] fp32 |",
        "|---|---:|---:|---:|",
    ]
    for name in ("bodies", "fused", "naive"):
        extra = results[name] - results["bodies"]
        lines.append(f"| {name} | {results[name] / mib:.1f} | "
                     f"{'' if name == 'bodies' else f'{extra / mib:.1f}'} | "
                     f"{'' if name == 'bodies' else f'{extra / unit:.3f}'} |")
    fused_ratio = (results["fused"] - results["bodies"]) / unit
    lines += ["", f"goal: fused extra <= 0.25 x [B*T, V] fp32: "
              f"{'met' if fused_ratio <= 0.25 else 'NOT met'} ({fused_ratio:.3f})"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
