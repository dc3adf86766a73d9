"""Distil a small Llama teacher into a smaller Llama student with FusedLinearDistillationLoss.

    python examples/distil_llama.py [--vocab 8192] [--teacher-steps 40] [--steps 40]

Both models are `transformers.LlamaForCausalLM` built from configs (random init, nothing is
downloaded). The teacher is first trained briefly on a synthetic language (each sequence counts
up with a stride of 1, 2 or 3 modulo 64, so the first tokens reveal the rule); the
student then learns from the teacher's final hidden states and lm-head through
`fastkd.FusedLinearDistillationLoss`, which never materialises [tokens, vocab] logits.
Finally the peak memory of the loss head (forward + backward on one batch of real hidden
states) is compared with the naive path that materialises both logits tensors.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch
import torch.nn.functional as F

import fastkd

try:  # transformers is a test/example dependency, not a dependency of fastkd
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as exc:  # pragma: no cover - reported by main() and the test
    LlamaConfig = LlamaForCausalLM = None
    TRANSFORMERS_ERROR = exc
else:
    TRANSFORMERS_ERROR = None


def build_model(vocab: int, hidden: int, layers: int, heads: int, seed: int):
    """A LlamaForCausalLM from a config (random init, untied lm-head)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def build_models(vocab: int = 8192, seed: int = 0):
    """(teacher, student): 2 layers x 128 wide vs 1 layer x 64 wide, same vocabulary."""
    return (build_model(vocab, 128, 2, 4, seed), build_model(vocab, 64, 1, 4, seed + 1))


#: Tokens the synthetic language uses (the rest of the vocabulary only costs memory and time).
ACTIVE_TOKENS = 64


def synthetic_batch(batch: int, seq: int, generator: torch.Generator):
    """(batch, seq) int64: start + stride * position mod ACTIVE_TOKENS, stride in {1, 2, 3}."""
    start = torch.randint(0, ACTIVE_TOKENS, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + stride * torch.arange(seq)) % ACTIVE_TOKENS


def train_teacher(teacher, steps: int, batch: int = 8, seq: int = 32, lr: float = 1e-2,
                  seed: int = 0) -> list:
    """Plain next-token cross-entropy on the synthetic language; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=lr)
    vocab, losses = teacher.config.vocab_size, []
    teacher.train()
    for _ in range(steps):
        ids = synthetic_batch(batch, seq, g)
        logits = teacher(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    teacher.eval()
    return losses


def head_inputs(student, teacher, ids):
    """Final hidden states (normed, before the lm-head) shifted for next-token prediction."""
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
    s_hidden = student.model(input_ids=ids).last_hidden_state[:, :-1]
    return s_hidden, t_hidden, ids[:, 1:]


def distil(student, teacher, steps: int, criterion, batch: int = 8, seq: int = 32,
           lr: float = 1e-2, seed: int = 1) -> list:
    """Trains the student on `criterion(s_hidden, W_s, t_hidden, W_t, labels)`; returns losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    losses = []
    student.train()
    for _ in range(steps):
        ids = synthetic_batch(batch, seq, g)
        s_hidden, t_hidden, labels = head_inputs(student, teacher, ids)
        loss = criterion(s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight,
                         labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def naive_loss(s_hidden, s_weight, t_hidden, t_weight, labels, temperature=2.0, alpha=0.5):
    """The textbook path: both logits tensors materialised, loss by autograd."""
    s = s_hidden @ s_weight.T
    with torch.no_grad():
        t = t_hidden @ t_weight.T
    logp_s = F.log_softmax(s / temperature, -1)
    logp_t = F.log_softmax(t / temperature, -1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), reduction="none")
    return (alpha * ce + (1 - alpha) * temperature**2 * kl.reshape(-1)).mean()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} missing from /proc/self/status")


def peak_rss_growth(fn) -> int:
    """Peak resident-memory growth while fn() runs (Linux only: raises OSError elsewhere).

    Free heap pages are first returned to the OS (glibc malloc_trim) and the high-water mark
    reset (/proc/self/clear_refs = 5), so every page touched beyond the baseline counts. It
    is an upper bound of the bytes of tensors alive at once (plus allocator slack)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    fn()
    return _status_bytes("VmHWM") - base


def head_peak_memory(student, teacher, ids, criterion) -> dict:
    """Peak memory of the loss head (fwd + bwd) for the fused criterion and the naive path,
    on the same real hidden states (detached: the backbones are the same in both paths)."""
    s_hidden, t_hidden, labels = head_inputs(student, teacher, ids)
    s_hidden = s_hidden.detach().requires_grad_(True)
    weight = student.lm_head.weight.detach().clone().requires_grad_(True)
    result = {}
    for name, fn in (("naive", naive_loss), ("fused", criterion)):
        def step(fn=fn):
            s_hidden.grad = weight.grad = None
            fn(s_hidden, weight, t_hidden, teacher.lm_head.weight, labels).backward()
        step()  # warm-up (first-call allocations of the libraries)
        result[name] = peak_rss_growth(step)
    result["logits_bytes"] = labels.numel() * student.config.vocab_size * 4
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args()
    if TRANSFORMERS_ERROR is not None:
        raise SystemExit(f"this example needs transformers: {TRANSFORMERS_ERROR}")
    torch.manual_seed(0)
    teacher, student = build_models(args.vocab)
    start = time.perf_counter()
    t_losses = train_teacher(teacher, args.teacher_steps)
    print(f"teacher CE: {t_losses[0]:.3f} -> {t_losses[-1]:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
    for p in teacher.parameters():
        p.requires_grad_(False)
    criterion = fastkd.FusedLinearDistillationLoss(temperature=2.0, alpha=0.5,
                                                   chunk_size=args.chunk_size)
    start = time.perf_counter()
    losses = distil(student, teacher, args.steps, criterion)
    print(f"student KD loss: {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
    ids = synthetic_batch(16, 64, torch.Generator().manual_seed(5))
    mem = head_peak_memory(student, teacher, ids, criterion)
    mib = 2**20
    print(f"loss head peak memory, 16 x 63 tokens, V={args.vocab}: naive "
          f"{mem['naive'] / mib:.1f} MiB, fused {mem['fused'] / mib:.1f} MiB "
          f"(one [N, V] float32 logits tensor = {mem['logits_bytes'] / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
