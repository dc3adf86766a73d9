"""`fastkd cache-teacher`: run a local causal LM over a JSON-lines file and store its top-k.

    fastkd cache-teacher --model DIR --data FILE.jsonl --k 64 --temperature 1.0 --out STORE
        [--text-field text] [--max-length 2048] [--batch-size 8] [--dtype auto|fp32|bf16|fp16]
        [--device cpu|cuda] [--trust-remote-code]

Each line of FILE.jsonl is a JSON object; its `--text-field` is tokenised with the model
directory's tokenizer (special tokens added, truncated to `--max-length`), the model runs once,
and for a sequence of L tokens the store gets L rows: row t holds the top-k log-probabilities at
`--temperature` of token t + 1 and their vocabulary indices, computed from the final hidden
states through the output embeddings with `fastkd.topk_teacher_logprobs` (never the full
logits; the config's `final_logit_softcapping` is honoured). The key of a record is the line's
`"id"` field (a string or an integer) when present, else the 0-based line number in the file.

Nothing is downloaded (`local_files_only`); remote code runs only with `--trust-remote-code`.
Rerunning the same command skips the keys already stored (resume after a crash or Ctrl-C; a
Ctrl-C seals the store cleanly). The store is a `fastkd.data.TopKStore`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from ..data import StoreLockedError, TopKStore, TopKWriter
from ..topk import topk_teacher_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# metadata that must match when a store is resumed
RESUME_FIELDS = ("model_config_sha256", "tokenizer_sha256", "text_field", "max_length",
                 "add_special_tokens")


class CacheTeacherError(Exception):
    """A user-facing error of the command (printed without a traceback)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastkd cache-teacher",
        description="Store a local causal LM's top-k log-probabilities for a JSON-lines "
                    "dataset (resumable: rerun to continue).")
    p.add_argument("--model", required=True, help="local model directory (config, weights, "
                   "tokenizer); never downloaded")
    p.add_argument("--data", required=True, help="JSON-lines file, one object per line")
    p.add_argument("--k", type=int, default=64, help="entries kept per token (default 64)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the stored log-probs (default 1.0)")
    p.add_argument("--out", required=True, help="store directory (created or resumed)")
    p.add_argument("--text-field", default="text", help="field holding the text (default text)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="truncate sequences to this many tokens (default 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows per lm-head chunk (default: 64 MiB of logits on cpu, 512 MiB "
                        "on cuda)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own Python code to run")
    return p


def read_records(path: str, text_field: str) -> List[Tuple[object, str]]:
    """[(key, text)] of a JSON-lines file; blank lines are skipped (but counted)."""
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise CacheTeacherError(f"{path}:{line_no + 1}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise CacheTeacherError(f"{path}:{line_no + 1}: expected a JSON object")
            text = rec.get(text_field)
            if not isinstance(text, str):
                raise CacheTeacherError(f"{path}:{line_no + 1}: field {text_field!r} must be a "
                                        f"string (see --text-field), got {type(text).__name__}")
            key = rec["id"] if "id" in rec else line_no
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise CacheTeacherError(f"{path}:{line_no + 1}: field 'id' must be a string "
                                        f"or an integer, got {key!r}")
            if key in seen:
                raise CacheTeacherError(f"{path}:{line_no + 1}: duplicate key {key!r}")
            seen.add(key)
            out.append((key, text))
    return out


def _sha256_file(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _softcap(config) -> Optional[float]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def load_teacher(args, device: torch.device, dtype: torch.dtype):
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CacheTeacherError("fastkd cache-teacher needs transformers: pip install "
                                "'fastkd[hf]'") from None
    if not os.path.isdir(args.model):
        raise CacheTeacherError(f"--model must be a local model directory, got {args.model!r}")
    opts = dict(local_files_only=True, trust_remote_code=bool(args.trust_remote_code))
    tokenizer = AutoTokenizer.from_pretrained(args.model, **opts)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **opts)
    model.to(device).eval()
    return tokenizer, model


def _hidden_states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last norm) without computing the logits."""
    out = model.get_decoder()(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def check_head(model, ids, length: int, lp, idx, temperature: float, dtype: torch.dtype
               ) -> None:
    """Compare the top-k from the hidden states with the model's own logits on one sequence.

    Catches models whose logits are not `lm_head(hidden)` (+ softcap), e.g. an extra logit
    scale, instead of silently storing wrong log-probs.
    """
    n = min(length, 32)  # the first sequence's own tokens, not its padding
    logits = model(input_ids=ids[:1, :n]).logits[0].float()
    ref = torch.log_softmax(logits / temperature, dim=-1).gather(-1, idx[0, :n])
    err = (ref - lp[0, :n]).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 0.25
    if not err <= tol:
        raise CacheTeacherError(
            f"the model's logits differ from its output embeddings applied to its final hidden "
            f"states (max |log-prob difference| {err:.3g} > {tol}): this architecture scales "
            "or transforms its logits in a way cache-teacher does not reproduce")


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="seq", desc="cache-teacher", dynamic_ncols=True)
    except ImportError:
        return None


def run(args) -> int:
    for name in ("k", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise CacheTeacherError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.temperature > 0:
        raise CacheTeacherError("--temperature must be > 0")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise CacheTeacherError("--chunk-size must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CacheTeacherError("--device cuda: no CUDA device is available")
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda"
                                       else torch.float32)
    records = read_records(args.data, args.text_field)
    tokenizer, model = load_teacher(args, device, dtype)
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    vocab = weight.shape[0]
    if args.k > vocab:
        raise CacheTeacherError(f"--k {args.k} exceeds the model's vocabulary size {vocab}")
    softcap = _softcap(model.config)
    meta = {"teacher": os.path.basename(os.path.normpath(args.model)),
            "model_config_sha256": _sha256_file(os.path.join(args.model, "config.json")),
            "tokenizer_sha256": _tokenizer_hash(tokenizer), "text_field": args.text_field,
            "max_length": args.max_length, "add_special_tokens": True,
            "dtype": str(dtype).replace("torch.", ""), "softcap": softcap,
            "data": os.path.basename(args.data),
            "layout": "row t of a sequence of L tokens: top-k of token t + 1"}
    resume = os.path.exists(os.path.join(args.out, "store.json"))
    if resume:
        stored = TopKStore(args.out).metadata["metadata"]
        for field in RESUME_FIELDS:
            if stored.get(field) != meta[field]:
                raise CacheTeacherError(
                    f"{args.out} was written with {field}={stored.get(field)!r}, this run has "
                    f"{meta[field]!r}: use another --out or the original settings")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    writer = TopKWriter(args.out, k=args.k, vocab_size=vocab, temperature=args.temperature,
                        metadata=None if resume else meta, resume=resume)
    pending = [(key, text) for key, text in records if key not in writer]
    skipped = len(records) - len(pending)
    print(f"cache-teacher: {len(records)} records in {args.data}, {skipped} already in "
          f"{args.out}, {len(pending)} to do (device {device}, {meta['dtype']}, k={args.k}, "
          f"T={args.temperature}, V={vocab})", file=sys.stderr)
    bar = _progress(len(pending))
    tokens, start, checked = 0, time.perf_counter(), False
    try:
        with writer, torch.inference_mode():
            for b0 in range(0, len(pending), args.batch_size):
                batch = pending[b0:b0 + args.batch_size]
                enc = tokenizer([t for _, t in batch], truncation=True,
                                max_length=args.max_length, add_special_tokens=True)
                seqs = [list(ids) for ids in enc["input_ids"]]
                width = max(1, max(len(s) for s in seqs))
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
                mask = torch.zeros((len(seqs), width), dtype=torch.int64)
                for i, s in enumerate(seqs):
                    ids[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
                    mask[i, :len(s)] = 1
                ids, mask = ids.to(device), mask.to(device)
                hidden = _hidden_states(model, ids, mask)
                lp, idx = topk_teacher_logprobs(hidden, weight, args.k, teacher_bias=bias,
                                                temperature=args.temperature, softcap=softcap,
                                                chunk_size=args.chunk_size)
                if not checked and len(seqs[0]):
                    check_head(model, ids, len(seqs[0]), lp, idx, args.temperature, dtype)
                    checked = True
                lp, idx = lp.cpu(), idx.cpu()
                for i, (key, _) in enumerate(batch):
                    writer.append(key, lp[i, :len(seqs[i])], idx[i, :len(seqs[i])])
                tokens += sum(len(s) for s in seqs)
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{rate:.0f}")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\ncache-teacher: interrupted; {len(TopKStore(args.out))} records are stored in "
              f"{args.out} - rerun the same command to continue", file=sys.stderr)
        return 130
    if bar is not None:
        bar.close()
    took = time.perf_counter() - start
    print(f"cache-teacher: wrote {len(pending)} sequences, {tokens} tokens in {took:.1f} s "
          f"({tokens / max(took, 1e-9):.0f} tokens/s) to {args.out}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # before the store was opened: nothing was written
        print("\nfastkd cache-teacher: interrupted", file=sys.stderr)
        return 130
    except (CacheTeacherError, StoreLockedError, FileNotFoundError, ValueError, OSError) as e:
        print(f"fastkd cache-teacher: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
