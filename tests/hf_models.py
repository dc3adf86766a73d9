"""Tiny transformers models and the textbook loss for the Hugging Face integration tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 97


def llama(hidden=32, layers=1, vocab=VOCAB, seed=0, tie=False, **config):
    """A LlamaForCausalLM from a config (nothing downloaded), fp32, eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2, **config)
    return transformers.LlamaForCausalLM(config).eval()


def gemma2(hidden=32, softcap=0.5, seed=0, vocab=VOCAB):
    """A Gemma2ForCausalLM (tied head, final_logit_softcapping) from a config."""
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, final_logit_softcapping=softcap, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    return transformers.Gemma2ForCausalLM(config).eval()


def full_logits(model, b):
    """The model's (B, T, V) logits of batch `b`."""
    return model(b["input_ids"], attention_mask=b["attention_mask"]).logits


def logits_without_grad(b, *models):
    """Each model's full logits of batch `b`, computed under torch.no_grad()."""
    with torch.no_grad():
        return tuple(full_logits(model, b) for model in models)


def tiny_config_model(name: str, **config):
    """transformers' `{name}ForCausalLM` from a one-layer `{name}Config` (vocabulary VOCAB,
    hidden 32), seeded with 0, eval mode; `config` adds the architecture's own fields."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **config)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def batch(b=3, t=9, vocab=VOCAB, seed=1, prompt=2):
    """input_ids (b, t), attention_mask with right padding, labels with a masked prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    lengths = torch.tensor([t - 2 * (i % 3) for i in range(b)])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def textbook(s_logits, t_logits, labels, *, temperature=1.0, alpha=0.5, num_items=None,
             divergence="kl"):
    """alpha * CE + (1 - alpha) * T^2 * KL(p_t || p_s) on shifted full logits (token mean)."""
    s, t, y = s_logits[:, :-1], t_logits[:, :-1, :s_logits.shape[-1]], labels[:, 1:]
    valid = y != -100
    logp_s = F.log_softmax(s / temperature, -1)
    logp_t = F.log_softmax(t / temperature, -1)
    if divergence == "kl":
        div = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    elif divergence == "jsd":
        m = (0.5 * logp_t.exp() + 0.5 * logp_s.exp()).log()
        div = 0.5 * (logp_t.exp() * (logp_t - m)).sum(-1) + \
            0.5 * (logp_s.exp() * (logp_s - m)).sum(-1)
    else:
        raise ValueError(divergence)
    ce = F.cross_entropy(s.transpose(1, 2), y.clamp(min=0), reduction="none")
    rows = alpha * ce + (1 - alpha) * temperature ** 2 * div
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    denom = valid.sum() if num_items is None else num_items
    return rows.sum() / denom


def examples(n=4, vocab=VOCAB, seed=3):
    """n variable-length examples (lists) with masked prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + (3 * i) % 7
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100] * (1 + i % 3) + ids[1 + i % 3:]
        out.append({"input_ids": ids, "labels": labels, "key": f"ex{i}"})
    return out


def collate(features):
    """Right-padded (B, L) input_ids / attention_mask / labels from example dicts."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros((len(features), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
