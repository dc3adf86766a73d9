"""Offline top-k distillation, end to end, on a CPU in well under a minute (no downloads).

1. Build a tiny Llama teacher from a config and a word-level tokenizer trained locally (with
   `tokenizers`) on generated text from a small stochastic grammar; train the teacher briefly.
2. Cache its top-k log-probabilities with `fastkd cache-teacher` (a crash-safe store on disk).
3. Distil a smaller student from the store (`TopKCollator` + `fastkd.sparse_distillation_loss`),
   and, from the same initialisation and for the same number of steps, a student distilled
   online from the teacher's dense logits (`fastkd.distillation_loss`).
4. Print both students' final training loss and their held-out dense KL(teacher || student)
   and cross-entropy.

    python examples/offline_topk.py [--steps 40] [--k 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

import fastkd
from fastkd.cli.cache_teacher import main as cache_teacher
from fastkd.data import TopKCollator, TopKStore

ADJ = "big small red blue old young quick lazy".split()
NOUN = "cat dog bird fish fox owl frog bear".split()
VERB = "sees chases eats likes follows finds".split()
PLACE = "under the tree|near the river|in the house|on the hill".split("|")


def sentence(rng: random.Random) -> str:
    """A grammar with learnable structure: each noun prefers some verbs and places."""
    words = []
    for _ in range(rng.randint(1, 3)):
        noun = rng.choice(NOUN)
        i = NOUN.index(noun)
        verb = VERB[(i + rng.choice([0, 0, 1])) % len(VERB)]
        obj = NOUN[(i * 3 + rng.choice([1, 1, 2])) % len(NOUN)]
        words += ["the", rng.choice(ADJ), noun, verb, "the", obj]
        if rng.random() < 0.5:
            words += PLACE[i % len(PLACE)].split()
        words.append(".")
    return " ".join(words)


def build_tokenizer(texts, directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<s>", "</s>", "[UNK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def pad(seqs, pad_id=0, ignore=-100):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), ignore)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s)] = torch.tensor(s)
    return ids, (labels != ignore).long(), labels


def train_teacher(model, seqs, steps: int, batch: int = 16):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(steps):
        ids, mask, labels = pad(rng.sample(seqs, batch))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(student, teacher, seqs):
    """Held-out dense KL(teacher || student) per token and the student's cross-entropy."""
    ids, mask, labels = pad(seqs)
    s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    y = labels[:, 1:]
    kl = fastkd.distillation_loss(s, t, y, alpha=0.0, backend="torch").item()
    ce = fastkd.distillation_loss(s, t, y, alpha=1.0, backend="torch").item()
    return kl, ce


def distil(student, batches, loss_fn, steps: int):
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = loss_fn(out.logits, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-5:]) / 5  # final loss: mean of the last 5 steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="student steps (each run)")
    p.add_argument("--teacher-steps", type=int, default=60)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--workdir", default=None, help="keep the teacher and store here")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="fastkd-offline-topk-") as work:
            return run(args, work)
    os.makedirs(args.workdir, exist_ok=True)
    return run(args, args.workdir)


def run(args, work: str) -> int:
    start = time.perf_counter()
    teacher_dir, store_dir = os.path.join(work, "teacher"), os.path.join(work, "store")
    data_file = os.path.join(work, "train.jsonl")
    rng = random.Random(0)
    texts = [sentence(rng) for _ in range(256)]
    held_out = [sentence(rng) for _ in range(64)]

    tok = build_tokenizer(texts, teacher_dir)
    encode = lambda t: tok(t, truncation=True, max_length=64)["input_ids"]  # noqa: E731
    seqs = [encode(t) for t in texts]
    teacher = tiny_llama(len(tok), hidden=64, layers=2, seed=0)
    t_loss = train_teacher(teacher, seqs, args.teacher_steps)
    teacher.save_pretrained(teacher_dir)
    teacher.eval().requires_grad_(False)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters())} params, V={len(tok)}, "
          f"train CE {t_loss:.3f}")

    with open(data_file, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    rc = cache_teacher(["--model", teacher_dir, "--data", data_file, "--k", str(args.k),
                        "--temperature", str(args.temperature), "--out", store_dir,
                        "--max-length", "64", "--batch-size", "32", "--device", "cpu",
                        "--dtype", "fp32"])
    if rc:
        return rc
    store = TopKStore(store_dir)
    print(f"store: {len(store)} sequences, {store.num_tokens} tokens, k={store.k}")

    # Same batches for both students: a HF-style dataset {key, input_ids} + the collator.
    features = [{"key": i, "input_ids": s} for i, s in enumerate(seqs)]
    collate = TopKCollator(store, pad_token_id=tok.pad_token_id)
    loader = torch.utils.data.DataLoader(features, batch_size=16, shuffle=True,
                                         collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    opts = dict(temperature=args.temperature, alpha=0.5)

    def offline(logits, b):
        return fastkd.sparse_distillation_loss(logits, b["teacher_topk_logprobs"],
                                               b["teacher_topk_indices"], b["shift_labels"],
                                               tail="renormalize", **opts)

    def online(logits, b):
        with torch.no_grad():
            t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return fastkd.distillation_loss(logits, t, b["shift_labels"], **opts)

    results = {}
    for name, fn in (("offline top-k (store)", offline), ("online dense", online)):
        student = tiny_llama(len(tok), hidden=32, layers=1, seed=1)  # same init for both
        t0 = time.perf_counter()
        final = distil(student, batches, fn, args.steps)
        took = time.perf_counter() - t0
        kl, ce = evaluate(student.eval(), teacher, [encode(t) for t in held_out])
        results[name] = (final, kl, ce, took)
    print(f"\n{'student (' + str(args.steps) + ' steps)':<24} {'final loss':>10} "
          f"{'held-out KL':>12} {'held-out CE':>12} {'train s':>8}")
    for name, (final, kl, ce, took) in results.items():
        print(f"{name:<24} {final:>10.4f} {kl:>12.4f} {ce:>12.4f} {took:>8.1f}")
    print("(final loss: mean of the last 5 steps; the offline loss uses the renormalised "
          f"top-{args.k} teacher, so it is not the same number as the dense one - compare the "
          "held-out columns)")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
