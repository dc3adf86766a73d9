"""Offline top-k teacher data: a crash-safe on-disk store, its writer and a batch collator.

    with fastkd.data.TopKWriter("store", k=64, vocab_size=V, temperature=1.0) as w:
        w.append(key, logprobs, indices)          # (L, k) each, key: str | int
    store = fastkd.data.TopKStore("store")
    logprobs, indices = store[key]                # float32 (L, k), int64 (L, k)
    collate = fastkd.data.TopKCollator(store, pad_token_id=tok.pad_token_id)

Layout (version 1; all integers little-endian). A store is a directory:

    store.json        {"format": "fastkd-topk-store", "version": 1, "k", "vocab_size",
                       "temperature", "value_dtype": "float16" | "bfloat16" | "float32",
                       "index_dtype": "int32" (vocab_size <= 2**31) | "int64", "metadata": {...}}
    shard-00000.bin   append-only records (below)
    shard-00000.json  the shard's index, written when the shard is sealed:
                      {"format": "fastkd-topk-shard", "version": 1, "shard": "shard-00000.bin",
                       "size": <bytes>, "records": [[key, offset, rows], ...]}
    shard-00001.bin   ...   (only the last shard may lack its .json: the one being written)
    .lock             flock()ed by the one writer

Shard file: a 32-byte header - magic "FKDTOPK1", u32 version, u32 k, u64 vocab_size, u8 value
dtype code, u8 index dtype code (float16 1, bfloat16 2, float32 3, int32 4, int64 5), 2 zero
bytes, u32 CRC-32 of the preceding 28 bytes - then records, each starting at a multiple of 8:

    offset 0   4 bytes  magic "TKR1"
           4   u32      CRC-32 (zlib) of every byte of the record after this field
           8   u32      rows L
          12   u16      key length n (bytes)
          14   u8       key type: 0 int (n = 8, signed i64), 1 str (UTF-8)
          15   u8       reserved, 0
          16   n bytes  key, zero padding to a multiple of 8
          I    L*k      indices (index_dtype), row-major (L, k), I = align8(16 + n)
          I+L*k*isz     values (value_dtype), row-major (L, k); zero padding to a multiple of 8

Cost per token: 6*k bytes with fp16 values and int32 indices, plus per record (not per token)
a 16-byte header, the key, up to 14 padding bytes and one JSON index entry: at most 6*k + 16
bytes per token for any record of L >= 8 tokens with keys of up to 24 bytes (checked by
tests/test_topk_store.py).

Crash safety. A record is written with one positioned write at the end of the last complete
record, so a writer killed at any instant leaves every earlier record intact and at most one
partial record at the end of the last (unsealed) shard. Readers scan an unsealed shard record by
record and stop at a partial tail; `TopKWriter(..., resume=True)` truncates it and continues.
Shard files and JSON indices are created by writing a temporary file, fsync and rename, so they
exist whole or not at all. Every record carries a CRC-32 that `TopKStore` checks on each read; a
mismatch, a sealed shard whose size differs from its index, or any header or index field out of
range raises `CorruptStoreError` naming the shard - never data, never an out-of-bounds read.
Opening a store parses JSON and fixed binary headers only: nothing is unpickled or executed.
Records are safe from a killed process as soon as `append` returns; `flush()` / `close()` also
fsync them against power loss.
"""

from ._format import CorruptStoreError
from .collator import TopKCollator
from .store import TopKStore
from .writer import DEFAULT_SHARD_BYTES, StoreLockedError, TopKWriter

__all__ = ["CorruptStoreError", "DEFAULT_SHARD_BYTES", "StoreLockedError", "TopKCollator",
           "TopKStore", "TopKWriter"]
