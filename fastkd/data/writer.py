"""`TopKWriter`: crash-safe, resumable, append-only writer of a top-k store.

The on-disk layout is documented in the `fastkd.data` module docstring and docs/topk_store.md.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import struct
import zlib
from typing import Dict, List, Optional, Tuple

import torch

from . import _format as F
from ._format import CorruptStoreError, Key

__all__ = ["TopKWriter", "StoreLockedError", "DEFAULT_SHARD_BYTES"]

#: a shard is sealed and a new one started once it would grow past this many bytes
DEFAULT_SHARD_BYTES = 1 << 30


class StoreLockedError(RuntimeError):
    """Another `TopKWriter` (in this or another process) holds the store."""


def _raw_bytes(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor (a plain memcpy through numpy when available)."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return bytes(t.reshape(-1).view(torch.uint8).tolist())
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bytes as int16
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _meta_equal(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class TopKWriter:
    """Append `(key, top-k log-probs, indices)` records to a crash-safe sharded store.

    Parameters
    ----------
    path : str or os.PathLike
        Store directory (created if missing).
    k : int
        Entries per token; every appended tensor is `(L, k)`.
    vocab_size : int
        Teacher vocabulary size V (indices lie in [0, V)); indices are stored as int32 when
        V <= 2**31, int64 otherwise.
    temperature : float
        The temperature the log-probs were taken at (recorded, checked on resume).
    value_dtype : torch.dtype
        Stored dtype of the log-probs: torch.float16 (default), torch.bfloat16 or
        torch.float32. Values below fp16's range (< -65504) are stored as -inf (probability 0).
    metadata : dict or None
        JSON-serialisable user metadata (teacher name, tokenizer hash, ...). On resume, None
        keeps the stored metadata and a different dict raises ValueError.
    resume : bool
        False: the store must not exist yet. True: continue an existing store after its last
        complete record (a store that does not exist yet is created).
    shard_bytes : int
        Shard size at which a new shard is started (records never span shards).

    Every `append` is one `pwrite` of a self-checking record, so a writer killed at any instant
    leaves every previously appended record intact; `close()` (or leaving the `with` block)
    seals the current shard with its JSON index. Only one writer may hold a store at a time.
    """

    def __init__(self, path, *, k: int, vocab_size: int, temperature: float,
                 value_dtype: torch.dtype = torch.float16, metadata: Optional[dict] = None,
                 resume: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES):
        for name, v, lo in (("k", k, 1), ("vocab_size", vocab_size, 1),
                            ("shard_bytes", shard_bytes, 1)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if k > vocab_size:
            raise ValueError(f"k must be <= vocab_size, got k={k}, vocab_size={vocab_size}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if value_dtype not in F.VALUE_DTYPES.values():
            raise TypeError("value_dtype must be torch.float16, torch.bfloat16 or "
                            f"torch.float32, got {value_dtype}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
        self.path = os.fspath(path)
        self._fmt = {"k": int(k), "vocab_size": int(vocab_size),
                     "temperature": float(temperature),
                     "value_dtype": F.dtype_name(value_dtype),
                     "index_dtype": "int32" if vocab_size <= (1 << 31) else "int64"}
        self._shard_bytes = int(shard_bytes)
        self._fd: Optional[int] = None
        self._lock_fd: Optional[int] = None
        self._keys: Dict[Key, int] = {}
        self._records: List[Tuple[Key, int, int]] = []  # of the current (unsealed) shard
        os.makedirs(self.path, exist_ok=True)
        self._lock()
        try:
            self._start(metadata, bool(resume))
        except BaseException:
            self._release()
            raise

    # -- set-up ---------------------------------------------------------------------------
    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock() on this platform: single-writer use is on the user
            return
        self._lock_fd = os.open(os.path.join(self.path, F.LOCK_FILE), os.O_RDWR | os.O_CREAT,
                                0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreLockedError(f"another TopKWriter holds the store at {self.path!r}"
                                   ) from None

    def _start(self, metadata: Optional[dict], resume: bool) -> None:
        store_file = os.path.join(self.path, F.STORE_FILE)
        if not os.path.exists(store_file):
            stray = [n for n in os.listdir(self.path) if F.SHARD_RE.match(n)]
            if stray:
                raise CorruptStoreError(f"store {self.path!r} has shard files but no "
                                        f"{F.STORE_FILE}")
            obj = {"format": F.STORE_FORMAT, "version": F.VERSION, **self._fmt,
                   "metadata": metadata or {}}
            F.write_json_atomic(store_file, obj)
            self.metadata = dict(metadata or {})
            self._new_shard(0)
            return
        if not resume:
            raise FileExistsError(f"a top-k store already exists at {self.path!r}; pass "
                                  "resume=True to continue it")
        fmt, shards = F.open_store_dir(self.path)
        for name in ("k", "vocab_size", "temperature", "value_dtype"):
            if fmt[name] != self._fmt[name]:
                raise ValueError(f"{name}={self._fmt[name]!r} does not match the existing "
                                 f"store's {name}={fmt[name]!r}")
        if metadata is not None and not _meta_equal(metadata, fmt["metadata"]):
            raise ValueError("metadata does not match the existing store's metadata (pass "
                             "metadata=None to keep it)")
        self._fmt["index_dtype"] = fmt["index_dtype"]
        self.metadata = fmt["metadata"]
        for number in shards:
            records, end, sealed = F.load_shard(self.path, number, fmt, verify=True)
            if not sealed and number != shards[-1]:
                raise CorruptStoreError(f"shard {F.shard_name(number)} of store {self.path}: "
                                        "has no index but is not the last shard")
            for key, _offset, _rows in records:
                if key in self._keys:
                    raise CorruptStoreError(f"store {self.path}: key {key!r} is stored twice")
                self._keys[key] = number
        if not shards or sealed:
            self._new_shard(len(shards))
        else:  # continue the unsealed last shard after its last complete record
            self._shard = shards[-1]
            self._fd = os.open(os.path.join(self.path, F.shard_name(self._shard)), os.O_RDWR)
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
            self._end, self._records = end, list(records)

    def _new_shard(self, number: int) -> None:
        name = os.path.join(self.path, F.shard_name(number))
        tmp = name + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        F.write_all(fd, F.pack_shard_header(self._fmt["k"], self._fmt["vocab_size"],
                                            self._fmt["value_dtype"], self._fmt["index_dtype"]),
                    0)
        os.fsync(fd)
        os.replace(tmp, name)  # the shard appears with its whole header or not at all
        F.fsync_dir(self.path)
        self._fd, self._shard, self._end, self._records = fd, number, F.SHARD_HEADER.size, []

    def _seal(self) -> None:
        os.ftruncate(self._fd, self._end)  # drop a partial record of an interrupted append
        os.fsync(self._fd)
        F.write_json_atomic(os.path.join(self.path, F.index_name(self._shard)), {
            "format": F.SHARD_FORMAT, "version": F.VERSION, "shard": F.shard_name(self._shard),
            "size": self._end, "records": [list(r) for r in self._records]})
        os.close(self._fd)
        self._fd = None

    # -- appending ------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self._fmt["k"]

    def __contains__(self, key) -> bool:
        return F.normalise_key(key) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> List[Key]:
        return list(self._keys)

    def append(self, key, logprobs: torch.Tensor, indices: torch.Tensor) -> None:
        """Append one sequence's top-k teacher.

        Parameters
        ----------
        key : str or int
            The sequence id; must not be in the store yet (ValueError).
        logprobs : Tensor (L, k), floating
            Top-k log-probabilities (<= 0, no NaN); stored in `value_dtype`.
        indices : Tensor (L, k), integer
            Their vocabulary indices in [0, vocab_size), unique within each row.
        """
        if self._fd is None:
            raise ValueError("append on a closed TopKWriter")
        key_type, key_bytes, key = F.encode_key(key)
        if key in self._keys:
            raise ValueError(f"key {key!r} is already in the store at {self.path!r}")
        idx_t, val_t = self._check_tensors(logprobs, indices)
        rows, k = idx_t.shape[0], self._fmt["k"]
        isz, vsz = F.ITEMSIZE[self._fmt["index_dtype"]], F.ITEMSIZE[self._fmt["value_dtype"]]
        idx_off, val_off, total = F.record_layout(rows, k, len(key_bytes), isz, vsz)
        if self._records and self._end + total > self._shard_bytes:
            self._seal()
            self._new_shard(self._shard + 1)
        buf = bytearray(total)
        hs = F.RECORD_HEADER.size
        buf[hs:hs + len(key_bytes)] = key_bytes
        if rows:
            buf[idx_off:val_off] = _raw_bytes(idx_t)
            buf[val_off:val_off + rows * k * vsz] = _raw_bytes(val_t)
        struct.pack_into("<IHBB", buf, 8, rows, len(key_bytes), key_type, 0)
        crc = zlib.crc32(memoryview(buf)[8:])
        struct.pack_into("<4sI", buf, 0, F.RECORD_MAGIC, crc)
        F.write_all(self._fd, buf, self._end)
        self._records.append((key, self._end, rows))
        self._end += total
        self._keys[key] = self._shard

    def _check_tensors(self, logprobs, indices) -> Tuple[torch.Tensor, torch.Tensor]:
        k, vocab = self._fmt["k"], self._fmt["vocab_size"]
        if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
            raise TypeError(f"logprobs must be a floating tensor, got "
                            f"{getattr(logprobs, 'dtype', type(logprobs).__name__)}")
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or \
                indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if logprobs.dim() != 2 or logprobs.shape[1] != k:
            raise ValueError(f"logprobs must have shape (L, k={k}), got {tuple(logprobs.shape)}")
        if indices.shape != logprobs.shape:
            raise ValueError(f"indices shape {tuple(indices.shape)} must equal logprobs shape "
                             f"{tuple(logprobs.shape)}")
        lp = logprobs.detach().to("cpu", torch.float32)
        idx = indices.detach().to("cpu", torch.int64)
        if lp.numel():
            if bool(torch.isnan(lp).any()) or bool((lp > 1e-3).any()):
                raise ValueError("logprobs must be log-probabilities (<= 0, no NaN); got "
                                 f"max {lp.max().item():.4g}")
            if bool(((idx < 0) | (idx >= vocab)).any()):
                raise ValueError(f"indices must lie in [0, {vocab}), got min "
                                 f"{idx.min().item()}, max {idx.max().item()}")
            srt = idx.sort(dim=1).values
            if bool((srt[:, 1:] == srt[:, :-1]).any()):
                raise ValueError("indices must be unique within each row")
        idx = idx.to(F.INDEX_DTYPES[self._fmt["index_dtype"]]).contiguous()
        val = lp.to(F.VALUE_DTYPES[self._fmt["value_dtype"]]).contiguous()
        return idx, val

    def flush(self) -> None:
        """fsync the current shard (records are already safe from a process crash)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Seal the current shard (write its index) and release the store. Idempotent."""
        try:
            if self._fd is not None:
                self._seal()
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> TopKWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
