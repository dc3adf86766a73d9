"""`fastkd cache-teacher` end to end on a tiny local Llama and a locally trained tokenizer."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from fastkd.__main__ import main as fastkd_main  # noqa: E402
from fastkd.cli import cache_teacher  # noqa: E402
from fastkd.data import TopKCollator, TopKStore  # noqa: E402

WORDS = ("the cat dog bird sees eats runs under over a big small red blue tree house fish "
         "river and then quickly slowly").split()


def _texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def build_teacher(directory, softcap=None):
    """A tiny random Llama and a word-level tokenizer trained on generated text, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_texts(200, seed=1), trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<s>", "</s>", "[UNK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if softcap is not None:
        config.final_logit_softcapping = softcap  # Llama ignores it: the head check must fail
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so top-k is not near-uniform
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    return fast, model.eval()


def write_jsonl(path, texts, ids=None):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            rec = {"text": t} if ids is None else {"id": ids[i], "text": t}
            f.write(json.dumps(rec) + "\n")


def _args(model, data, out, *extra):
    return ["cache-teacher", "--model", str(model), "--data", str(data), "--k", "8",
            "--temperature", "2.0", "--out", str(out), "--batch-size", "3",
            "--max-length", "16", "--device", "cpu", *extra]


def test_cache_teacher_end_to_end_and_resume(tmp_path, capsys):
    tokenizer, model = build_teacher(tmp_path / "teacher")
    texts = _texts(7)
    data, out = tmp_path / "data.jsonl", tmp_path / "store"
    write_jsonl(data, texts[:4], ids=["a", "b", 3, "d"])
    assert fastkd_main(_args(tmp_path / "teacher", data, out)) == 0
    store = TopKStore(out)
    assert store.keys() == ["a", "b", 3, "d"] and store.temperature == 2.0 and store.k == 8
    meta = store.metadata["metadata"]
    assert meta["teacher"] == "teacher" and meta["max_length"] == 16
    for key, text in zip(["a", "b", 3, "d"], texts[:4]):
        ids = tokenizer(text, truncation=True, max_length=16)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        full = torch.log_softmax(logits / 2.0, dim=-1)
        lp, idx = store[key]
        assert lp.shape == (len(ids), 8)
        ref = full.gather(-1, idx)
        # exact up to the fp16 storage of the values
        torch.testing.assert_close(lp.double(), ref, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(lp.double(), full.topk(8).values, rtol=2e-3, atol=2e-3)
    assert "tokens/s" in capsys.readouterr().err
    before = {key: store[key] for key in store.keys()}

    # rerun over a longer file: the stored keys are skipped, the new ones added
    write_jsonl(data, texts, ids=["a", "b", 3, "d", "e", 5, "g"])
    assert fastkd_main(_args(tmp_path / "teacher", data, out)) == 0
    assert "4 already in" in capsys.readouterr().err
    store = TopKStore(out)
    assert store.keys() == ["a", "b", 3, "d", "e", 5, "g"]
    for key, (lp, idx) in before.items():
        assert torch.equal(store[key][0], lp) and torch.equal(store[key][1], idx)

    # the collator builds batches aligned with input_ids of the same tokenizer
    feats = [{"key": key, "input_ids": tokenizer(t, truncation=True, max_length=16)["input_ids"]}
             for key, t in zip(["e", 5], texts[4:6])]
    batch = TopKCollator(store, pad_token_id=tokenizer.pad_token_id)(feats)
    n = len(feats[0]["input_ids"])
    assert torch.equal(batch["teacher_topk_indices"][0, :n - 1], store["e"][1][:n - 1])


def test_keys_default_to_line_numbers_and_interrupt_resumes(tmp_path, monkeypatch, capsys):
    build_teacher(tmp_path / "teacher")
    data, out = tmp_path / "data.jsonl", tmp_path / "store"
    texts = _texts(7, seed=3)
    write_jsonl(data, texts)
    real, calls = cache_teacher.topk_teacher_logprobs, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(cache_teacher, "topk_teacher_logprobs", interrupted)
    assert fastkd_main(_args(tmp_path / "teacher", data, out)) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert TopKStore(out).keys() == [0, 1, 2]  # the first batch, sealed
    monkeypatch.setattr(cache_teacher, "topk_teacher_logprobs", real)
    assert fastkd_main(_args(tmp_path / "teacher", data, out)) == 0
    assert TopKStore(out).keys() == list(range(7))
    # a rerun with another tokenisation setting is refused, not mixed into the store
    assert fastkd_main(_args(tmp_path / "teacher", data, out)[:-4] + [
        "--max-length", "8", "--device", "cpu"]) == 1
    assert "max_length" in capsys.readouterr().err


def test_errors(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "the cat"}\n{"id": 1.5, "text": "a dog"}\n')
    assert fastkd_main(_args(tmp_path / "nope", data, tmp_path / "s")) == 1
    assert "data.jsonl:2" in capsys.readouterr().err  # records are read before the model
    data.write_text('{"text": "the cat"}\n')
    assert fastkd_main(_args(tmp_path / "nope", data, tmp_path / "s")) == 1
    assert "local model directory" in capsys.readouterr().err
    build_teacher(tmp_path / "capped", softcap=5.0)  # config softcap the model does not apply
    assert fastkd_main(_args(tmp_path / "capped", data, tmp_path / "s2")) == 1
    assert "logits differ" in capsys.readouterr().err
