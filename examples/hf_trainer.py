"""Distil a tiny Llama teacher into a tinier Llama student with `DistillationTrainer`.

    python examples/hf_trainer.py [--steps 120]

Everything is built locally (nothing is downloaded): a word-level tokenizer trained with
`tokenizers` on the example's own text, and two `LlamaForCausalLM` built from configs. The
text comes from a random Markov chain over 48 words, so the next word is genuinely uncertain
and its true distribution is known (the entropy rate is the best achievable loss).

1. The teacher (2 layers x 96) learns the chain from 4096 sentences (`transformers.Trainer`).
2. Two copies of the student (1 layer x 32, same init) train for the same number of steps on
   only 96 sentences: one on the labels alone (`transformers.Trainer`), one with
   `DistillationTrainer` (the teacher's full next-word distributions, through the fused
   lm-head loss: no [B, T, V] logits).
3. Both are evaluated on 512 held-out sentences (cross-entropy per predicted word).

Distillation helps because the teacher's soft targets carry what 96 sentences cannot: the
probabilities of every word, not one sample of them.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F

WORDS = 48
LENGTH = 24


def markov_chain(seed: int = 0):
    """(start probabilities (W,), transitions (W, W)) of a random, fairly peaked chain."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.full((WORDS, WORDS), 0.15), torch.ones(()))
    torch.manual_seed(seed)
    trans = gamma.sample() + 1e-6
    trans = trans / trans.sum(-1, keepdim=True)
    start = torch.rand(WORDS, generator=g)
    return start / start.sum(), trans


def sentences(n: int, chain, seed: int) -> list:
    """n sentences of LENGTH words drawn from the chain."""
    start, trans = chain
    g = torch.Generator().manual_seed(seed)
    words = [torch.multinomial(start.expand(n, -1), 1, generator=g)[:, 0]]
    for _ in range(LENGTH - 1):
        words.append(torch.multinomial(trans[words[-1]], 1, generator=g)[:, 0])
    rows = torch.stack(words, 1).tolist()
    return [" ".join(f"w{i}" for i in row) for row in rows]


def entropy_rate(chain) -> float:
    """Mean per-word entropy of the chain's transitions (its stationary mix), in nats."""
    _, trans = chain
    pi = torch.full((WORDS,), 1.0 / WORDS)
    for _ in range(200):
        pi = pi @ trans
    ent = -(trans * trans.clamp_min(1e-12).log()).sum(-1)
    return float((pi * ent).sum())


def train_tokenizer(texts: list):
    """A word-level tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]")


def llama(tokenizer, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def encode(tokenizer, texts: list) -> list:
    return [{"input_ids": ids, "labels": list(ids)}
            for ids in tokenizer(texts)["input_ids"]]


def collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])  # one length: no padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def eval_ce(model, data) -> float:
    """Cross-entropy per predicted word over `data` (nats)."""
    model.eval()
    batch = collate(data)
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits[:, :-1]
    return float(F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:]))


def common_args(out: str, steps: int, lr: float, batch: int) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0,
                weight_decay=0.0, logging_steps=max(1, steps // 4), save_strategy="no",
                report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="student steps (both runs)")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-sentences", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args()
    from transformers import Trainer, TrainingArguments

    from fastkd.integrations.transformers import DistillationArguments, DistillationTrainer

    torch.set_num_threads(1)  # tiny models: one thread is fastest (and fair on a shared machine)
    t0 = time.perf_counter()
    chain = markov_chain()
    teacher_text = sentences(4096, chain, seed=1)
    student_text = sentences(args.student_sentences, chain, seed=2)
    eval_text = sentences(512, chain, seed=3)
    tokenizer = train_tokenizer(teacher_text)
    teacher_data, student_data = encode(tokenizer, teacher_text), encode(tokenizer, student_text)
    eval_data = encode(tokenizer, eval_text)
    out = tempfile.mkdtemp(prefix="fastkd-hf-")

    teacher = llama(tokenizer, 96, 2, seed=0)
    Trainer(model=teacher, args=TrainingArguments(**common_args(
        os.path.join(out, "teacher"), args.teacher_steps, 3e-3, 32)),
        train_dataset=teacher_data, data_collator=collate).train()
    print(f"teacher: eval CE {eval_ce(teacher, eval_data):.3f} nats/word "
          f"(entropy rate of the chain {entropy_rate(chain):.3f}; uniform "
          f"{math.log(WORDS):.3f}) [{time.perf_counter() - t0:.0f} s]")

    student_args = common_args(os.path.join(out, "student"), args.steps, 3e-3, 16)
    baseline = llama(tokenizer, 32, 1, seed=1)
    Trainer(model=baseline, args=TrainingArguments(**student_args),
            train_dataset=student_data, data_collator=collate).train()
    base_ce = eval_ce(baseline, eval_data)

    student = llama(tokenizer, 32, 1, seed=1)
    kd_args = DistillationArguments(**student_args, temperature=args.temperature,
                                    alpha=args.alpha)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=kd_args,
                                  train_dataset=student_data, data_collator=collate,
                                  processing_class=tokenizer)
    trainer.train()
    kd_ce = eval_ce(student, eval_data)
    logs = [h for h in trainer.state.log_history if "kd" in h]
    if logs:
        print(f"distillation logs (last): loss {logs[-1]['loss']:.3f} ce {logs[-1]['ce']:.3f} "
              f"kd {logs[-1]['kd']:.3f}")
    print(f"student after {args.steps} steps on {args.student_sentences} sentences, eval CE "
          f"(nats/word): labels only {base_ce:.3f}, with distillation {kd_ce:.3f} "
          f"({'better' if kd_ce < base_ce else 'NOT better'} by {base_ce - kd_ce:+.3f}) "
          f"[{time.perf_counter() - t0:.0f} s total]")


if __name__ == "__main__":
    main()
