"""`fastkd.data.TopKCollator`: (B, L, k) top-k batches aligned with shifted labels."""

import math

import pytest
import torch

import fastkd
from fastkd.data import TopKCollator, TopKStore, TopKWriter
from fastkd.topk import topk_teacher_logprobs_from_logits

V, K, IG = 64, 5, -100


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Sequences of lengths 7, 3, 11, 1 with their teacher top-k stored under keys."""
    path = tmp_path_factory.mktemp("collator") / "store"
    torch.manual_seed(0)
    feats = []
    with TopKWriter(path, k=K, vocab_size=V, temperature=1.0,
                    value_dtype=torch.float32) as w:
        for i, n in enumerate([7, 3, 11, 1]):
            ids = torch.randint(3, V, (n,))
            lp, idx = topk_teacher_logprobs_from_logits(torch.randn(n, V) * 3, K)
            key = f"s{i}" if i % 2 else i
            w.append(key, lp, idx)
            feats.append({"key": key, "input_ids": ids.tolist(), "text": "ignored"})
    feats[2]["labels"] = [IG] * 4 + feats[2]["input_ids"][4:]  # a masked prompt
    return TopKStore(path), feats


def test_alignment_and_padding(dataset):
    store, feats = dataset
    batch = TopKCollator(store, pad_token_id=1, ignore_index=IG)(feats)
    b, length = 4, 11
    assert batch["input_ids"].shape == (b, length) == batch["labels"].shape
    assert batch["teacher_topk_logprobs"].shape == (b, length, K)
    assert batch["teacher_topk_logprobs"].dtype == torch.float32
    assert batch["teacher_topk_indices"].dtype == torch.int64
    for i, feat in enumerate(feats):
        ids, n = feat["input_ids"], len(feat["input_ids"])
        labels = feat.get("labels", ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert bool((batch["input_ids"][i, n:] == 1).all())
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
        assert batch["labels"][i].tolist() == labels + [IG] * (length - n)
        assert batch["shift_labels"][i].tolist() == labels[1:] + [IG] * (length - n + 1)
        lp, idx = store[feat["key"]]
        for t in range(length):
            got_lp = batch["teacher_topk_logprobs"][i, t]
            got_idx = batch["teacher_topk_indices"][i, t]
            if t < n - 1 and labels[t + 1] != IG:  # row t predicts token t + 1
                assert torch.equal(got_lp, lp[t]) and torch.equal(got_idx, idx[t])
            else:  # ignored: the documented filler
                assert got_idx.tolist() == list(range(K))
                torch.testing.assert_close(got_lp, torch.full((K,), -math.log(K)))


def test_loss_on_batch_equals_per_sequence_loss(dataset):
    store, feats = dataset
    batch = TopKCollator(store, ignore_index=IG)(feats)
    torch.manual_seed(1)
    logits = torch.randn(4, 11, V) * 2
    opts = dict(tail="renormalize", temperature=1.0, alpha=0.3, reduction="sum",
                ignore_index=IG)
    got = fastkd.sparse_distillation_loss(logits, batch["teacher_topk_logprobs"],
                                          batch["teacher_topk_indices"], batch["shift_labels"],
                                          **opts)
    want = torch.zeros((), dtype=torch.float64)
    for i, feat in enumerate(feats):
        n = len(feat["input_ids"])
        if n < 2:
            continue
        lp, idx = store[feat["key"]]
        target = torch.tensor(feat.get("labels", feat["input_ids"])[1:])
        want += fastkd.sparse_distillation_loss(logits[i, :n - 1], lp[:n - 1], idx[:n - 1],
                                                target, **opts).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_truncation_multiple_and_tensor_inputs(dataset):
    store, feats = dataset
    tensor_feats = [{"key": torch.tensor(f["key"]) if isinstance(f["key"], int) else f["key"],
                     "input_ids": torch.tensor(f["input_ids"])} for f in feats]
    batch = TopKCollator(store, max_length=6, pad_to_multiple_of=4)(tensor_feats)
    assert batch["input_ids"].shape == (4, 8)
    lp, _ = store[feats[2]["key"]]
    assert torch.equal(batch["teacher_topk_logprobs"][2, :5], lp[:5])
    assert batch["shift_labels"][2, 5].item() == IG  # the truncated sequence's last token


def test_errors(dataset):
    store, feats = dataset
    collate = TopKCollator(store)
    with pytest.raises(ValueError, match="s1"):
        collate([{"key": "s1", "input_ids": [5, 6]}])  # 3 rows stored
    with pytest.raises(KeyError, match="nope"):
        collate([{"key": "nope", "input_ids": [5, 6]}])
    with pytest.raises(ValueError, match="input_ids"):
        collate([{"key": 0}])
    with pytest.raises(ValueError, match="max_length"):
        TopKCollator(store, max_length=0)
    with pytest.raises(TypeError, match="pad_token_id"):
        TopKCollator(store, pad_token_id=None)


def test_dataloader_workers_with_collator(dataset):
    store, feats = dataset
    loader = torch.utils.data.DataLoader(feats * 3, batch_size=2, num_workers=2,
                                         collate_fn=TopKCollator(store))
    batches = list(loader)
    assert len(batches) == 6
    ref = TopKCollator(store)(feats[:2])
    assert torch.equal(batches[0]["teacher_topk_logprobs"], ref["teacher_topk_logprobs"])


def pre_padded(feat, width, where, pad=1, seed=0):
    """`feat` padded to `width` with an attention_mask: "left", "right" or "holes" (pads
    at random places among the tokens, so the attended positions are not contiguous)."""
    ids = feat["input_ids"]
    labels = feat.get("labels", ids)
    n = len(ids)
    if where == "left":
        attended = list(range(width - n, width))
    elif where == "right":
        attended = list(range(n))
    else:
        g = torch.Generator().manual_seed(seed)
        attended = sorted(torch.randperm(width, generator=g)[:n].tolist())
    out = {"key": feat["key"], "input_ids": [pad] * width, "labels": [IG] * width,
           "attention_mask": [0] * width}
    for j, t in enumerate(attended):
        out["input_ids"][t], out["labels"][t], out["attention_mask"][t] = ids[j], labels[j], 1
    return out, attended


@pytest.mark.parametrize("where", ["left", "right", "holes"])
def test_pre_padded_features_match_the_unpadded_batch(dataset, where):
    store, feats = dataset
    ref = TopKCollator(store, ignore_index=IG)(feats)
    padded = [pre_padded(f, 15, where, seed=i) for i, f in enumerate(feats)]
    batch = TopKCollator(store, ignore_index=IG)([p for p, _ in padded])
    assert batch["input_ids"].shape == (4, 15)
    for i, (feat, (_, attended)) in enumerate(zip(feats, padded)):
        n, pos = len(feat["input_ids"]), torch.tensor(attended)
        # the target of an attended position is the next attended token, as unpadded
        assert torch.equal(batch["shift_labels"][i, pos], ref["shift_labels"][i, :n])
        for name in ("teacher_topk_logprobs", "teacher_topk_indices"):
            assert torch.equal(batch[name][i, pos], ref[name][i, :n])
        others = torch.ones(15, dtype=torch.bool)
        others[pos] = False
        assert bool((batch["shift_labels"][i, others] == IG).all())  # pads: no target
        assert batch["labels"][i, pos[0]].item() == IG  # nothing predicts the first token
        assert int((batch["labels"][i, 1:] != IG).sum()) == \
            int((batch["shift_labels"][i] != IG).sum())  # older transformers' item count


def test_pre_padded_truncation(dataset):
    store, feats = dataset
    feat, _ = pre_padded(feats[0], 12, "left")  # 7 tokens at positions 5..11
    batch = TopKCollator(store, max_length=9)([feat])
    lp, _ = store[feats[0]["key"]]
    assert batch["input_ids"].shape == (1, 9)
    assert torch.equal(batch["teacher_topk_logprobs"][0, 5:8], lp[:3])
    assert batch["shift_labels"][0, 8].item() == IG  # the truncated sequence's last token


def test_row_count_mismatch_names_key_rows_and_lengths(dataset):
    store, feats = dataset
    collate = TopKCollator(store)
    bad = {"key": "s1", "input_ids": [5] * 6, "attention_mask": [0, 1, 1, 1, 1, 0]}
    with pytest.raises(ValueError, match=r"'s1' has 3 top-k rows in the store but 6 "
                                         r"input_ids and 4 attended positions"):
        collate([bad])
    with pytest.raises(ValueError, match=r"'s1' has 3 top-k rows .* 2 input_ids and no "
                                         r"attention_mask"):
        collate([{"key": "s1", "input_ids": [5, 6]}])
