"""`TopKStore`: read-only, memory-mapped, fork-safe reader of a top-k store.

The on-disk layout is documented in the `fastkd.data` module docstring and docs/topk_store.md.
"""

from __future__ import annotations

import mmap
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from . import _format as F
from ._format import CorruptStoreError, Key

__all__ = ["TopKStore", "CorruptStoreError"]


class TopKStore:
    """Read-only, memory-mapped view of a top-k store: `store[key] -> (logprobs, indices)`.

    Parameters
    ----------
    path : str or os.PathLike
        Store directory written by `TopKWriter` (possibly by a writer that was killed, or that
        is still running: the records complete at opening time are visible).
    verify : bool
        Check each record's CRC-32 when it is read (default True; a mismatch raises
        `CorruptStoreError` naming the shard).

    Opening parses only JSON and fixed binary headers and validates every offset against the
    file sizes. Shards are memory-mapped lazily in each process (re-opened after a fork), so
    one store object can be shared by DataLoader workers. `len(store)`, `key in store`,
    `store.keys()`, `store.metadata`.
    """

    def __init__(self, path, *, verify: bool = True):
        self.path = os.fspath(path)
        self.verify = bool(verify)
        fmt, shards = F.open_store_dir(self.path)
        self._fmt = fmt
        self._index: Dict[Key, Tuple[int, int, int]] = {}
        self._sizes: List[int] = []
        for number in shards:
            records, size, sealed = F.load_shard(self.path, number, fmt, verify=False)
            if not sealed and number != shards[-1]:
                raise CorruptStoreError(f"shard {F.shard_name(number)} of store {self.path}: "
                                        "has no index but is not the last shard")
            F.build_key_table(self._index, records, number, f"store {self.path}")
            self._sizes.append(size)
        self._pid: Optional[int] = None
        self._maps: Dict[int, Tuple[object, mmap.mmap]] = {}

    @property
    def metadata(self) -> dict:
        """k, vocab_size, temperature, value_dtype, index_dtype and the user's `metadata`."""
        return {**{n: self._fmt[n] for n in ("k", "vocab_size", "temperature", "value_dtype",
                                             "index_dtype")},
                "metadata": dict(self._fmt["metadata"])}

    @property
    def k(self) -> int:
        return self._fmt["k"]

    @property
    def vocab_size(self) -> int:
        return self._fmt["vocab_size"]

    @property
    def temperature(self) -> float:
        return self._fmt["temperature"]

    @property
    def num_tokens(self) -> int:
        return sum(rows for _, _, rows in self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key) -> bool:
        return F.normalise_key(key) in self._index

    def keys(self) -> List[Key]:
        return list(self._index)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._index))

    def rows(self, key) -> int:
        """Number of tokens L stored under `key` (no data read)."""
        return self._index[self._lookup(key)][2]

    def _lookup(self, key) -> Key:
        norm = F.normalise_key(key)
        if norm is None:
            raise TypeError(f"key must be a str or an int, got {type(key).__name__}")
        if norm not in self._index:
            raise KeyError(key)
        return norm

    def _map(self, shard: int) -> Tuple[object, mmap.mmap]:
        if self._pid != os.getpid():  # first use in this process (or after a fork)
            self._maps, self._pid = {}, os.getpid()
        if shard not in self._maps:
            f = open(os.path.join(self.path, F.shard_name(shard)), "rb")
            size = self._sizes[shard]
            if os.fstat(f.fileno()).st_size < size:
                f.close()
                raise CorruptStoreError(f"shard {F.shard_name(shard)} of store {self.path}: "
                                        "truncated after the store was opened")
            self._maps[shard] = (f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))
        return self._maps[shard]

    def __getitem__(self, key) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logprobs float32 (L, k), indices int64 (L, k)) of `key`; KeyError if absent."""
        key = self._lookup(key)
        shard, offset, rows = self._index[key]
        f, mm = self._map(shard)
        where = f"shard {F.shard_name(shard)} of store {self.path}"
        # A file shrunk under a live mapping would fault (SIGBUS) instead of raising.
        if os.fstat(f.fileno()).st_size < self._sizes[shard]:
            raise CorruptStoreError(f"{where}: truncated after the store was opened")
        parsed = F.parse_record(mm, offset, self._sizes[shard], self._fmt, where)
        if parsed is None or parsed[0] != key or parsed[1] != rows:
            raise CorruptStoreError(f"{where}: the record at offset {offset} is not the "
                                    f"indexed record of key {key!r}")
        total = parsed[2]
        with memoryview(mm) as whole, whole[offset:offset + total] as part:
            record = bytearray(part)  # one copy; verified and decoded below
        if self.verify:
            F.check_record_crc(record, where, offset)
        k = self._fmt["k"]
        key_len = len(F.encode_key(key)[1])
        isz, vsz = F.ITEMSIZE[self._fmt["index_dtype"]], F.ITEMSIZE[self._fmt["value_dtype"]]
        idx_off, val_off, _ = F.record_layout(rows, k, key_len, isz, vsz)
        if rows == 0:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        idx = torch.frombuffer(record, dtype=F.INDEX_DTYPES[self._fmt["index_dtype"]],
                               count=rows * k, offset=idx_off)
        val = torch.frombuffer(record, dtype=F.VALUE_DTYPES[self._fmt["value_dtype"]],
                               count=rows * k, offset=val_off)
        return (val.to(torch.float32).reshape(rows, k),
                idx.to(torch.int64).reshape(rows, k))

    def verify_all(self) -> int:
        """Read and check every record; returns the number of records (raises on corruption)."""
        for key in self._index:
            self[key]
        return len(self._index)

    def close(self) -> None:
        for f, mm in self._maps.values():
            mm.close()
            f.close()
        self._maps = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, None  # maps are re-opened in the new process
        return state

    def __enter__(self) -> TopKStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TopKStore({self.path!r}, records={len(self)}, k={self.k}, "
                f"vocab_size={self.vocab_size}, temperature={self.temperature})")
