"""On-policy batches (GKD): the student completes each prompt of a batch by sampling."""

from __future__ import annotations

import torch


def _eos_ids(model) -> set:
    ids = set()
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids


def prompts_of(inputs: dict, ignore_index: int = -100) -> list:
    """Per sequence, the list of its prompt token ids: the attended tokens before the first
    target (a label at position >= 1 that is not `ignore_index`; all tokens when none)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    labels = inputs.get("labels")
    out = []
    for b in range(ids.shape[0]):
        keep = torch.ones(ids.shape[1], dtype=torch.bool) if mask is None else \
            mask[b].bool().cpu()
        if labels is not None:
            # labels[:, 0] is never a target (causal shift): the prompt ends before the
            # first target token at position >= 1
            targets = (labels[b, 1:] != ignore_index).nonzero()
            if targets.numel():
                keep[int(targets[0]) + 1:] = False
        out.append(ids[b].cpu()[keep].tolist())
    return out


def sample_completions(model, inputs: dict, *, max_new_tokens: int, temperature: float,
                       pad_token_id: int) -> dict:
    """Right-padded `input_ids`, `attention_mask`, `labels` with sampled completions.

    Parameters
    ----------
    model : a transformers causal LM (PEFT models included) with `.generate`.
    inputs : dict with (B, T) `input_ids` and optional `attention_mask`, `labels`.
    max_new_tokens, temperature : sampling of at most `max_new_tokens` tokens per prompt from
        ``softmax(logits / temperature)`` (no top-k, no top-p); stops at the model's EOS.
    pad_token_id : filler of padding.

    Returns
    -------
    dict of (B, L) int64 tensors on the inputs' device; labels are -100 on prompts and
    padding and equal the sampled tokens (EOS included) elsewhere.
    """
    device = inputs["input_ids"].device
    prompts = prompts_of(inputs)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("on-policy sampling needs a non-empty prompt in every sequence "
                         "(the tokens before the first label that is not -100)")
    width = max(len(p) for p in prompts)
    batch = len(prompts)
    left = torch.full((batch, width), pad_token_id, dtype=torch.int64)
    left_mask = torch.zeros((batch, width), dtype=torch.int64)
    for b, p in enumerate(prompts):
        left[b, width - len(p):] = torch.tensor(p, dtype=torch.int64)
        left_mask[b, width - len(p):] = 1
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=left.to(device), attention_mask=left_mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0,
                                 pad_token_id=pad_token_id)
    finally:
        model.train(was_training)
    completions = out[:, width:].cpu()
    eos = _eos_ids(model)
    rows = []
    for b, p in enumerate(prompts):
        comp = completions[b].tolist()
        for i, tok in enumerate(comp):
            if tok in eos:
                comp = comp[:i + 1]
                break
        rows.append((p, comp))
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((batch, length), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((batch, length), dtype=torch.int64)
    labels = torch.full((batch, length), -100, dtype=torch.int64)
    for b, (p, c) in enumerate(rows):
        seq = torch.tensor(p + c, dtype=torch.int64)
        ids[b, :len(seq)] = seq
        mask[b, :len(seq)] = 1
        if c:
            labels[b, len(p):len(seq)] = torch.tensor(c, dtype=torch.int64)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}
