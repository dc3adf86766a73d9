"""On-disk layout of the top-k store: constants, record encoding and validated parsing.

Everything read from disk goes through the checks here before it is used as an offset or a
size, so a malformed or hostile store gives `CorruptStoreError` (naming the file), never an
out-of-bounds read, a huge allocation, or code execution (only JSON and fixed binary structs are
parsed). The layout itself is documented in `fastkd.data` (module docstring) and
`docs/topk_store.md`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import zlib
from typing import Dict, List, Optional, Tuple, Union

import torch

Key = Union[int, str]

STORE_FILE = "store.json"
LOCK_FILE = ".lock"
STORE_FORMAT = "fastkd-topk-store"
SHARD_FORMAT = "fastkd-topk-shard"
VERSION = 1
SHARD_MAGIC = b"FKDTOPK1"
RECORD_MAGIC = b"TKR1"
# shard header: magic, version, k, vocab_size, value code, index code, 2 pad bytes, crc32
SHARD_HEADER = struct.Struct("<8sIIQBB2xI")
# record header: magic, crc32 (of everything after it), rows, key length, key type, reserved
RECORD_HEADER = struct.Struct("<4sIIHBB")
ALIGN = 8
KEY_INT, KEY_STR = 0, 1
MAX_KEY_BYTES = 0xFFFF
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
SHARD_RE = re.compile(r"^shard-(\d{5,})\.bin$")
INDEX_RE = re.compile(r"^shard-(\d{5,})\.json$")

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INDEX_DTYPES = {"int32": torch.int32, "int64": torch.int64}
DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3, "int32": 4, "int64": 5}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "int64": 8}


class CorruptStoreError(ValueError):
    """A store file is malformed, truncated or fails its checksum (the message names it)."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def index_name(number: int) -> str:
    return f"shard-{number:05d}.json"


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in {**VALUE_DTYPES, **INDEX_DTYPES}.items():
        if dt == dtype:
            return name
    raise KeyError(dtype)


def encode_key(key) -> Tuple[int, bytes, Key]:
    """(key type, key bytes, normalised key) of a str or int key; TypeError/ValueError else."""
    if isinstance(key, str):
        raw = key.encode("utf-8")
        if len(raw) > MAX_KEY_BYTES:
            raise ValueError(f"key must be at most {MAX_KEY_BYTES} UTF-8 bytes, got {len(raw)}")
        return KEY_STR, raw, key
    if isinstance(key, bool) or not hasattr(key, "__index__"):
        raise TypeError(f"key must be a str or an int, got {type(key).__name__}")
    key = int(key.__index__())
    if not INT64_MIN <= key <= INT64_MAX:
        raise ValueError(f"key must fit in a signed 64-bit integer, got {key}")
    return KEY_INT, key.to_bytes(8, "little", signed=True), key


def normalise_key(key) -> Optional[Key]:
    """The dictionary key for `key`, or None when it cannot be a store key."""
    try:
        return encode_key(key)[2]
    except (TypeError, ValueError):
        return None


def record_layout(rows: int, k: int, key_len: int, isz: int, vsz: int) -> Tuple[int, int, int]:
    """(offset of the indices, offset of the values, total padded size) inside a record."""
    idx_off = aligned(RECORD_HEADER.size + key_len)
    val_off = idx_off + rows * k * isz
    return idx_off, val_off, aligned(val_off + rows * k * vsz)


def pack_shard_header(k: int, vocab: int, value: str, index: str) -> bytes:
    body = SHARD_HEADER.pack(SHARD_MAGIC, VERSION, k, vocab, DTYPE_CODES[value],
                             DTYPE_CODES[index], 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def check_shard_header(data: bytes, where: str, k: int, vocab: int, value: str, index: str):
    if len(data) < SHARD_HEADER.size:
        raise CorruptStoreError(f"{where}: shorter ({len(data)} bytes) than its "
                                f"{SHARD_HEADER.size}-byte header")
    magic, version, hk, hvocab, vcode, icode, crc = SHARD_HEADER.unpack_from(data, 0)
    if magic != SHARD_MAGIC:
        raise CorruptStoreError(f"{where}: not a fastkd top-k shard (bad magic {magic!r})")
    if zlib.crc32(data[:SHARD_HEADER.size - 4]) != crc:
        raise CorruptStoreError(f"{where}: shard header fails its checksum")
    if version != VERSION:
        raise CorruptStoreError(f"{where}: unsupported shard version {version}")
    if (hk, hvocab, vcode, icode) != (k, vocab, DTYPE_CODES[value], DTYPE_CODES[index]):
        raise CorruptStoreError(f"{where}: header (k={hk}, vocab_size={hvocab}) does not match "
                                f"{STORE_FILE} (k={k}, vocab_size={vocab}, dtypes)")


def _int_field(obj: dict, name: str, where: str, lo: int, hi: int) -> int:
    v = obj.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CorruptStoreError(f"{where}: field {name!r} must be an integer in [{lo}, {hi}], "
                                f"got {v!r}")
    return v


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(path: str, where: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptStoreError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptStoreError(f"{where}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def write_json_atomic(path: str, obj: dict) -> None:
    """Write `path` via a temporary file, fsync and rename: it exists whole or not at all."""
    tmp = path + ".tmp"
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def parse_store_json(obj: dict, where: str) -> dict:
    """Validated store-level fields of `store.json`."""
    if obj.get("format") != STORE_FORMAT:
        raise CorruptStoreError(f"{where}: field 'format' must be {STORE_FORMAT!r}, got "
                                f"{obj.get('format')!r}")
    version = _int_field(obj, "version", where, 0, 1 << 31)
    if version != VERSION:
        raise CorruptStoreError(f"{where}: unsupported version {version} (this fastkd reads "
                                f"{VERSION})")
    k = _int_field(obj, "k", where, 1, (1 << 31) - 1)
    vocab = _int_field(obj, "vocab_size", where, 1, (1 << 62))
    if k > vocab:
        raise CorruptStoreError(f"{where}: k={k} exceeds vocab_size={vocab}")
    temp = obj.get("temperature")
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0:
        raise CorruptStoreError(f"{where}: field 'temperature' must be a number > 0, got "
                                f"{temp!r}")
    value, index = obj.get("value_dtype"), obj.get("index_dtype")
    if value not in VALUE_DTYPES:
        raise CorruptStoreError(f"{where}: field 'value_dtype' must be one of "
                                f"{sorted(VALUE_DTYPES)}, got {value!r}")
    if index not in INDEX_DTYPES or (index == "int32" and vocab > (1 << 31)):
        raise CorruptStoreError(f"{where}: field 'index_dtype' must be 'int32' (vocab_size "
                                f"<= 2**31) or 'int64', got {index!r}")
    meta = obj.get("metadata", {})
    if not isinstance(meta, dict):
        raise CorruptStoreError(f"{where}: field 'metadata' must be a JSON object")
    return {"k": k, "vocab_size": vocab, "temperature": float(temp), "value_dtype": value,
            "index_dtype": index, "metadata": meta}


def parse_shard_index(obj: dict, where: str, shard: str, file_size: int, fmt: dict
                      ) -> List[Tuple[Key, int, int]]:
    """Validated `[(key, offset, rows), ...]` of a sealed shard; every record fits the file."""
    if obj.get("format") != SHARD_FORMAT or obj.get("version") != VERSION:
        raise CorruptStoreError(f"{where}: fields 'format'/'version' must be "
                                f"{SHARD_FORMAT!r}/{VERSION}")
    if obj.get("shard") != shard:
        raise CorruptStoreError(f"{where}: field 'shard' must be {shard!r}, got "
                                f"{obj.get('shard')!r}")
    size = _int_field(obj, "size", where, SHARD_HEADER.size, 1 << 62)
    if size != file_size:
        raise CorruptStoreError(f"shard {shard}: file is {file_size} bytes but its index "
                                f"records {size} (truncated or modified)")
    records = obj.get("records")
    if not isinstance(records, list):
        raise CorruptStoreError(f"{where}: field 'records' must be a list")
    k, isz, vsz = fmt["k"], ITEMSIZE[fmt["index_dtype"]], ITEMSIZE[fmt["value_dtype"]]
    out, end = [], SHARD_HEADER.size
    for i, rec in enumerate(records):
        if not (isinstance(rec, list) and len(rec) == 3):
            raise CorruptStoreError(f"{where}: records[{i}] must be [key, offset, rows]")
        key, offset, rows = rec
        if normalise_key(key) is None or isinstance(key, bool):
            raise CorruptStoreError(f"{where}: records[{i}] key must be a str or an int")
        for name, v in (("offset", offset), ("rows", rows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CorruptStoreError(f"{where}: records[{i}] {name} must be an integer "
                                        f">= 0, got {v!r}")
        key_len = len(encode_key(key)[1])
        total = record_layout(rows, k, key_len, isz, vsz)[2]
        if offset < end or offset % ALIGN or offset + total > size:
            raise CorruptStoreError(f"{where}: records[{i}] (offset {offset}, {rows} rows) "
                                    f"overlaps another record or lies outside the "
                                    f"{size}-byte shard")
        end = offset + total
        out.append((key, offset, rows))
    return out


def parse_record(buf, offset: int, limit: int, fmt: dict, where: str):
    """Decode the record header at `offset` of `buf` (no more than `limit` bytes).

    Returns (key, rows, total size) or None when the bytes left cannot hold the whole record
    (a torn tail). A bad magic or a malformed header raises `CorruptStoreError`.
    """
    if offset + RECORD_HEADER.size > limit:
        return None
    magic, _crc, rows, key_len, key_type, reserved = RECORD_HEADER.unpack_from(buf, offset)
    if magic != RECORD_MAGIC or key_type not in (KEY_INT, KEY_STR) or reserved:
        raise CorruptStoreError(f"{where}: malformed record header at offset {offset}")
    if key_type == KEY_INT and key_len != 8:
        raise CorruptStoreError(f"{where}: malformed integer key at offset {offset}")
    isz, vsz = ITEMSIZE[fmt["index_dtype"]], ITEMSIZE[fmt["value_dtype"]]
    total = record_layout(rows, fmt["k"], key_len, isz, vsz)[2]
    if offset + total > limit:
        return None
    raw = bytes(buf[offset + RECORD_HEADER.size: offset + RECORD_HEADER.size + key_len])
    if key_type == KEY_INT:
        key: Key = int.from_bytes(raw, "little", signed=True)
    else:
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptStoreError(f"{where}: record key at offset {offset} is not "
                                    "UTF-8") from None
    return key, rows, total


def check_record_crc(record, where: str, offset: int) -> None:
    crc = RECORD_HEADER.unpack_from(record, 0)[1]
    if zlib.crc32(memoryview(record)[8:]) != crc:
        raise CorruptStoreError(f"{where}: record at offset {offset} fails its checksum "
                                "(corrupted data)")


def scan_shard(buf, size: int, fmt: dict, where: str, verify: bool = True
               ) -> Tuple[List[Tuple[Key, int, int]], int]:
    """Records of an unsealed shard, in order, and the end of the last complete one.

    A trailing partial record (a writer killed mid-append) ends the scan; a complete record
    that fails its checksum raises `CorruptStoreError`.
    """
    out, offset = [], SHARD_HEADER.size
    while True:
        parsed = parse_record(buf, offset, size, fmt, where)
        if parsed is None:
            return out, offset
        key, rows, total = parsed
        if verify:
            check_record_crc(buf[offset:offset + total], where, offset)
        out.append((key, offset, rows))
        offset += total


def list_shards(path: str) -> List[int]:
    """Shard numbers present in the store directory, which must be 0, 1, ..., n-1."""
    names = os.listdir(path)
    numbers = sorted(int(m.group(1)) for m in map(SHARD_RE.match, names) if m)
    indexed = {int(m.group(1)) for m in map(INDEX_RE.match, names) if m}
    if numbers != list(range(len(numbers))) or not indexed <= set(numbers):
        missing = sorted(set(range(max(numbers + list(indexed)) + 1)) - set(numbers))
        raise CorruptStoreError(f"store {path}: shard files are not numbered 0..n-1 "
                                f"(missing {[shard_name(n) for n in missing][:5]})")
    return numbers


def build_key_table(entries: Dict[Key, tuple], new, shard: int, where: str) -> None:
    for key, offset, rows in new:
        if key in entries:
            raise CorruptStoreError(f"{where}: key {key!r} is stored twice")
        entries[key] = (shard, offset, rows)


def open_store_dir(path: str) -> Tuple[dict, List[int]]:
    """Validated `store.json` fields and the shard numbers of a store directory."""
    store_file = os.path.join(path, STORE_FILE)
    if not os.path.isfile(store_file):
        raise FileNotFoundError(f"no top-k store at {path!r} (missing {STORE_FILE})")
    fmt = parse_store_json(read_json(store_file, store_file), store_file)
    return fmt, list_shards(path)


def load_shard(path: str, number: int, fmt: dict, verify: bool):
    """(records, readable size, sealed) of one shard; validated against the file."""
    name = shard_name(number)
    where = f"shard {name} of store {path}"
    shard_file, index_file = os.path.join(path, name), os.path.join(path, index_name(number))
    with open(shard_file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = f.read(SHARD_HEADER.size)
        check_shard_header(header, where, fmt["k"], fmt["vocab_size"], fmt["value_dtype"],
                           fmt["index_dtype"])
        if os.path.exists(index_file):
            obj = read_json(index_file, f"index {index_name(number)} of store {path}")
            records = parse_shard_index(obj, f"index {index_name(number)} of shard "
                                        f"{name} in store {path}", name, size, fmt)
            return records, size, True
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
            records, end = scan_shard(mm, size, fmt, where, verify)
        return records, end, False
