"""`fastkd.data.TopKWriter` / `TopKStore`: round trip, size bound, crash safety, corruption."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastkd.data import CorruptStoreError, StoreLockedError, TopKStore, TopKWriter

V, K = 500, 16

MAKE = textwrap.dedent("""
    import torch
    def make(i, V=500, K=16):
        g = torch.Generator().manual_seed(1000 + i)
        rows = (i * 37) % 41 + 1
        logits = torch.randn(rows, V, generator=g) * 3
        top = torch.log_softmax(logits, -1).topk(K, dim=-1)
        return top.values, top.indices
""")
_ns: dict = {}
exec(MAKE, _ns)
make = _ns["make"]


def key_of(i):
    return i if i % 3 else f"doc-{i}"


def write(path, n, start=0, **kw):
    kw.setdefault("resume", start > 0)
    with TopKWriter(path, k=K, vocab_size=V, temperature=1.0, **kw) as w:
        for i in range(start, n):
            w.append(key_of(i), *make(i))


def check(store, i, value_dtype=torch.float16):
    lp, idx = store[key_of(i)]
    ref_lp, ref_idx = make(i)
    assert lp.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx, ref_idx)
    assert torch.equal(lp, ref_lp.to(value_dtype).float())


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_shards_and_metadata(tmp_path, value_dtype):
    path = tmp_path / "store"
    meta = {"teacher": "tiny", "tokenizer_sha256": "ab" * 32}
    with TopKWriter(path, k=K, vocab_size=V, temperature=2.0, value_dtype=value_dtype,
                    metadata=meta, shard_bytes=20_000) as w:
        for i in range(30):
            w.append(key_of(i), *make(i))
        w.append("empty", torch.empty(0, K), torch.empty(0, K, dtype=torch.int64))
        assert len(w) == 31 and key_of(4) in w
    store = TopKStore(path)
    assert len([n for n in os.listdir(path) if n.endswith(".bin")]) > 2  # sharded
    assert len(store) == 31 and store.keys()[:4] == [key_of(i) for i in range(4)]
    assert 3 not in store and "doc-3" in store and 4 in store and "4" not in store
    for i in range(30):
        check(store, i, value_dtype)
    assert store["empty"][0].shape == (0, K)
    assert store.metadata == {"k": K, "vocab_size": V, "temperature": 2.0,
                              "value_dtype": str(value_dtype).split(".")[-1],
                              "index_dtype": "int32", "metadata": meta}
    assert store.num_tokens == sum(make(i)[0].shape[0] for i in range(30))
    with pytest.raises(KeyError):
        store["missing"]
    with pytest.raises(TypeError, match="key"):
        store[1.5]


def test_bytes_per_token_bound(tmp_path):
    k, rows, n = 64, 8, 40  # short records: the per-record overhead is the worst case
    path = tmp_path / "store"
    with TopKWriter(path, k=k, vocab_size=128256, temperature=1.0) as w:
        for i in range(n):
            lp, idx = torch.randn(rows, k).abs().neg(), torch.randperm(128256)[:rows * k]
            w.append(f"sequence-{i:015d}", lp, idx.reshape(rows, k))  # 24-byte keys
    files = [p for p in path.iterdir() if p.name != ".lock"]
    total = sum(p.stat().st_size for p in files)
    assert total <= (6 * k + 16) * rows * n, total / (rows * n)


def test_duplicate_key_and_writer_errors(tmp_path):
    path = tmp_path / "store"
    write(path, 3)
    with TopKWriter(path, k=K, vocab_size=V, temperature=1.0, resume=True) as w:
        with pytest.raises(ValueError, match="already in the store"):
            w.append(key_of(1), *make(1))
        with pytest.raises(ValueError, match="already in the store"):
            w.append(key_of(0), *make(0))  # a str key
        with pytest.raises(StoreLockedError, match="another TopKWriter"):
            TopKWriter(path, k=K, vocab_size=V, temperature=1.0, resume=True)
        lp, idx = make(7)
        with pytest.raises(ValueError, match="logprobs"):
            w.append(99, lp[:, :3], idx[:, :3])
        with pytest.raises(ValueError, match="indices"):
            w.append(99, lp, idx + V)
        with pytest.raises(ValueError, match="unique"):
            w.append(99, lp, torch.zeros_like(idx))
        with pytest.raises(ValueError, match="log-probabilities"):
            w.append(99, lp + 5, idx)
        with pytest.raises(TypeError, match="indices"):
            w.append(99, lp, idx.float())
        with pytest.raises(TypeError, match="key"):
            w.append(1.5, lp, idx)
        w.append(99, lp, idx)
    with pytest.raises(FileExistsError, match="resume=True"):
        TopKWriter(path, k=K, vocab_size=V, temperature=1.0)
    with pytest.raises(ValueError, match="k="):
        TopKWriter(path, k=K + 1, vocab_size=V, temperature=1.0, resume=True)
    with pytest.raises(ValueError, match="temperature"):
        TopKWriter(path, k=K, vocab_size=V, temperature=2.0, resume=True)
    with pytest.raises(ValueError, match="metadata"):
        TopKWriter(path, k=K, vocab_size=V, temperature=1.0, resume=True, metadata={"a": 1})
    with pytest.raises(ValueError, match="vocab_size"):
        TopKWriter(tmp_path / "x", k=K, vocab_size=K - 1, temperature=1.0)
    with pytest.raises(TypeError, match="value_dtype"):
        TopKWriter(tmp_path / "x", k=K, vocab_size=V, temperature=1.0, value_dtype=torch.int8)
    store = TopKStore(path)
    assert len(store) == 4
    assert torch.equal(store[99][1], make(7)[1])


CHILD = MAKE + textwrap.dedent("""
    import sys
    from fastkd.data import TopKWriter
    w = TopKWriter(sys.argv[1], k=16, vocab_size=500, temperature=1.0, resume=True,
                   shard_bytes=30_000)
    i = int(sys.argv[2])
    while True:
        w.append(i if i % 3 else f"doc-{i}", *make(i))
        print(i, flush=True)
        i += 1
""")


def _run_and_kill(path, start, after):
    """Start a writer subprocess at record `start`, SIGKILL it once `after` records are done."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(start)],
                            stdout=subprocess.PIPE, text=True, env=env)
    done = []
    try:
        for line in proc.stdout:
            done.append(int(line))
            if len(done) >= after:
                proc.send_signal(signal.SIGKILL)  # mid-append of the next record, or between
                break
    finally:
        proc.kill()
        proc.wait()
    assert len(done) >= after, "writer subprocess died early"
    return done


def test_resume_after_killed_writer(tmp_path):
    path = tmp_path / "store"
    done = _run_and_kill(path, 0, 25)
    store = TopKStore(path)  # the last shard is unsealed (no index), maybe with a torn tail
    assert len(store) >= len(done) and store.keys() == [key_of(i) for i in range(len(store))]
    for i in range(len(store)):
        check(store, i)
    start = len(store)
    done2 = _run_and_kill(path, start, 15)  # resume on an unsealed shard
    assert done2[0] == start
    resumed = len(TopKStore(path))
    assert resumed >= start + len(done2)
    write(path, resumed + 10, start=resumed)  # resume once more and close (seal)
    store = TopKStore(path)
    assert len(store) == resumed + 10
    assert store.keys() == [key_of(i) for i in range(len(store))]
    for i in range(len(store)):
        check(store, i)
    assert store.verify_all() == len(store)


def _unseal_last(path):
    """Make the store look like its writer was killed: drop the last shard's index."""
    last = sorted(p for p in path.iterdir() if p.suffix == ".bin")[-1]
    last.with_suffix(".json").unlink()
    return last


def test_torn_tail_at_every_cut(tmp_path):
    path = tmp_path / "store"
    write(path, 6)
    last = _unseal_last(path)
    data = last.read_bytes()
    full = TopKStore(path)
    assert len(full) == 6
    offsets = sorted(off for _, off, _ in full._index.values())
    for cut in sorted({offsets[-1] + d for d in (0, 1, 8, 15, 16, 17, 40, 100)} |
                      {len(data) - 1, len(data) - 8}):
        last.write_bytes(data[:cut])
        store = TopKStore(path)
        assert len(store) == 5  # the torn last record is not data
        for i in range(5):
            check(store, i)
    write(path, 8, start=5)  # resume truncates the torn tail and continues
    store = TopKStore(path)
    assert len(store) == 8
    for i in range(8):
        check(store, i)


def _record_offset(path, key):
    store = TopKStore(path)
    shard, offset, _ = store._index[key]
    return path / f"shard-{shard:05d}.bin", offset


@pytest.mark.parametrize("where", [4, 9, 20, 200, -3])
def test_flipped_byte_is_detected_naming_the_shard(tmp_path, where):
    path = tmp_path / "store"
    write(path, 6)
    shard, offset = _record_offset(path, key_of(4))
    raw = bytearray(shard.read_bytes())
    rows = make(4)[0].shape[0]
    pos = offset + where if where >= 0 else offset + 16 + 8 + rows * K * 4 + 20  # a value
    raw[pos] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match=shard.name):
        TopKStore(path)[key_of(4)]
    check(TopKStore(path), 3)  # other records still read


def test_corruption_in_unsealed_shard_is_not_a_torn_tail(tmp_path):
    path = tmp_path / "store"
    write(path, 6)
    shard, offset = _record_offset(path, key_of(2))
    _unseal_last(path)
    raw = bytearray(shard.read_bytes())
    raw[offset + 100] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match=shard.name):
        TopKStore(path)[key_of(2)]
    with pytest.raises(CorruptStoreError, match="checksum"):
        TopKWriter(path, k=K, vocab_size=V, temperature=1.0, resume=True)


def test_truncated_sealed_shard(tmp_path):
    path = tmp_path / "store"
    write(path, 6, shard_bytes=4_000)
    assert (path / "shard-00002.bin").exists()
    shard = path / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptStoreError, match="shard-00000.bin.*truncated"):
        TopKStore(path)
    last = sorted(path.glob("shard-*.bin"))[-1]
    last.unlink()  # its index remains: records are missing
    with pytest.raises(CorruptStoreError, match=last.name):
        TopKStore(path)
    (path / "shard-00001.bin").unlink()
    with pytest.raises(CorruptStoreError, match="shard-00001.bin"):
        TopKStore(path)


def _edit_json(file, fn):
    obj = json.loads(file.read_text())
    fn(obj)
    file.write_text(json.dumps(obj))


@pytest.mark.parametrize("edit,match", [
    (lambda o: o.update(k=-1), "'k'"),
    (lambda o: o.update(k="16"), "'k'"),
    (lambda o: o.update(k=17), "shard-00000.bin"),
    (lambda o: o.update(vocab_size=True), "'vocab_size'"),
    (lambda o: o.update(value_dtype="pickle"), "'value_dtype'"),
    (lambda o: o.update(temperature=-1), "'temperature'"),
    (lambda o: o.update(format="other"), "'format'"),
    (lambda o: o.update(version=9), "version"),
    (lambda o: o.update(metadata=[1]), "'metadata'"),
])
def test_malformed_store_json(tmp_path, edit, match):
    path = tmp_path / "store"
    write(path, 2)
    _edit_json(path / "store.json", edit)
    with pytest.raises(CorruptStoreError, match=match):
        TopKStore(path)


@pytest.mark.parametrize("edit,match", [
    (lambda o: o["records"][1].__setitem__(1, 10**12), "records\\[1\\]"),
    (lambda o: o["records"][1].__setitem__(1, 8), "records\\[1\\]"),  # overlaps the header
    (lambda o: o["records"][1].__setitem__(1, o["records"][0][1]), "records\\[1\\]"),
    (lambda o: o["records"][0].__setitem__(2, 2**40), "records\\[0\\]"),
    (lambda o: o["records"][0].__setitem__(2, -1), "rows"),
    (lambda o: o["records"][0].__setitem__(0, 1.5), "key"),
    (lambda o: o["records"].append(["x", 1]), "records\\[2\\]"),
    (lambda o: o.update(size=10), "size"),
    (lambda o: o.update(records={"a": 1}), "'records'"),
])
def test_malformed_shard_index(tmp_path, edit, match):
    path = tmp_path / "store"
    write(path, 2)
    _edit_json(path / "shard-00000.json", edit)
    with pytest.raises(CorruptStoreError, match=match) as err:
        TopKStore(path)
    assert "shard-00000" in str(err.value)


def test_index_pointing_at_the_wrong_record(tmp_path):
    path = tmp_path / "store"
    write(path, 3)
    _edit_json(path / "shard-00000.json",
               lambda o: o["records"][0].__setitem__(0, "other"))  # offset/rows still valid
    store = TopKStore(path)
    with pytest.raises(CorruptStoreError, match="shard-00000.bin"):
        store["other"]


def test_not_json_and_bad_shard_header(tmp_path):
    path = tmp_path / "store"
    write(path, 2)
    (path / "shard-00000.json").write_bytes(b"\x80\x04\x95 not json")  # a pickle-like blob
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        TopKStore(path)
    write(tmp_path / "s2", 2)
    shard = tmp_path / "s2" / "shard-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[12] ^= 1  # the header's k field
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError, match="shard-00000.bin.*checksum"):
        TopKStore(tmp_path / "s2")
    with pytest.raises(FileNotFoundError):
        TopKStore(tmp_path / "nothing")


def test_reader_sees_records_of_a_live_writer(tmp_path):
    path = tmp_path / "store"
    with TopKWriter(path, k=K, vocab_size=V, temperature=1.0) as w:
        for i in range(4):
            w.append(key_of(i), *make(i))
        store = TopKStore(path)
        assert len(store) == 4
        check(store, 2)
        w.append(key_of(4), *make(4))
    assert len(TopKStore(path)) == 5


class _Records(torch.utils.data.Dataset):
    def __init__(self, store, n):
        self.store, self.n = store, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        lp, idx = self.store[key_of(i)]
        return i, lp.sum(), idx.sum(), os.getpid()


def test_dataloader_workers(tmp_path):
    path = tmp_path / "store"
    write(path, 20, shard_bytes=20_000)
    store = TopKStore(path)
    store[key_of(0)]  # maps a shard in the parent before the workers fork
    loader = torch.utils.data.DataLoader(_Records(store, 20), batch_size=None, num_workers=2)
    seen, pids = {}, set()
    for i, lp_sum, idx_sum, pid in loader:
        seen[i] = (lp_sum, idx_sum)
        pids.add(pid)
    assert len(pids) == 2 and os.getpid() not in pids
    clone = pickle.loads(pickle.dumps(store))  # what a spawn-started worker receives
    assert torch.equal(clone[key_of(5)][1], make(5)[1])
    for i in range(20):
        lp, idx = make(i)
        assert seen[i][0] == lp.half().float().sum() and seen[i][1] == idx.sum()


def test_append_without_numpy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # `import numpy` raises ImportError
    write(tmp_path / "store", 3, value_dtype=torch.bfloat16)
    monkeypatch.undo()
    store = TopKStore(tmp_path / "store")
    for i in range(3):
        check(store, i, torch.bfloat16)


def test_interrupt_mid_append_then_close(tmp_path, monkeypatch):
    """Ctrl-C inside the write of a record: close() drops the partial bytes and seals."""
    import fastkd.data._format as fmt

    path = tmp_path / "store"
    real = fmt.write_all
    w = TopKWriter(path, k=K, vocab_size=V, temperature=1.0)
    for i in range(3):
        w.append(key_of(i), *make(i))

    def half_then_interrupt(fd, data, offset):
        real(fd, memoryview(data)[:len(data) // 2], offset)
        raise KeyboardInterrupt

    monkeypatch.setattr(fmt, "write_all", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        w.append(key_of(3), *make(3))
    monkeypatch.setattr(fmt, "write_all", real)
    assert key_of(3) not in w
    w.close()
    store = TopKStore(path)
    assert len(store) == 3 and store.verify_all() == 3  # the sealed shard holds no partial bytes
    write(path, 5, start=3)
    store = TopKStore(path)
    for i in range(5):
        check(store, i)
