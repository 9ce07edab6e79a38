"""Reading GGUF files: memory-mapped, lazy, validated.

The container layout (header, typed key/value metadata, tensor records, aligned data) is parsed
here with `struct` over a memory map; `gguf` (llama.cpp's gguf-py) supplies the type enums and block
sizes, and its `GGUFReader` is the oracle our tests compare against. We parse ourselves because
`GGUFReader` builds a numpy view per vocabulary string (2.4 s for a 49k-token vocab) and reads
tensor records without bounds checks; opening a file here reads only its header (~0.1 s).

What we check before trusting a file we did not write:
- magic, version, and counts a file of that size can hold (a hostile count fails at once);
- every length and offset against the end of the file (a truncated file names what it cut);
- every tensor record: known ggml type, 1-4 dims, row length a multiple of the block size,
  aligned offset, data inside the file.

Metadata comes out as plain Python values (`GGUFFile.metadata`), tensors as `TensorInfo` records;
tensor bytes are read-only views of the memory map (`GGUFFile.raw(name)`).

Shapes follow PyTorch/numpy order (rows first, row length last): ggml's `[576, 49152]` for
`token_embd.weight` is `(49152, 576)` here.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from .errors import GGUFError, shown

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic u32, version u32, tensor_count u64, kv_count u64
MIN_KV_BYTES = 8 + 1 + 4  # key length u64, a 1-byte key, value type u32 (the value itself may be 1 byte more)
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (..., rows, row_length)
    n_elements: int
    n_bytes: int
    offset: int  # absolute byte offset of the data in the file

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.type][0]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / max(self.n_elements, 1)


# value type -> (struct format, byte size) for scalar GGUF values
_SCALARS = {
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2), GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8), GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NP = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class _Cursor:
    """Sequential little-endian reads from a buffer; running past the end is a GGUFError."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated while reading {what} at byte {self.pos:,} "
                            f"(needs {n:,} bytes, file has {self.size:,})")

    def scalar(self, fmt: str, n: int, what: str):
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", 8, what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="surrogateescape")

    def value_type(self, what: str) -> GGUFValueType:
        t = self.scalar("<I", 4, what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise GGUFError(f"{self.path}: {what} has unknown value type {t}") from None

    def value(self, vtype: GGUFValueType, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what)
        if vtype == GGUFValueType.ARRAY:
            etype = self.value_type(what)
            n = self.scalar("<Q", 8, what)
            if etype in _NP:
                size = np.dtype(_NP[etype]).itemsize
                self.need(n * size, what)
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=n, offset=self.pos)
                self.pos += n * size
                return arr.tolist()
            if etype == GGUFValueType.STRING:
                if n * 8 > self.size - self.pos:
                    raise GGUFError(f"{self.path}: {what} claims {n:,} strings, more than the file can hold")
                return [self.string(what) for _ in range(n)]
            raise GGUFError(f"{self.path}: {what} is an array of {etype.name}, not supported")
        raise GGUFError(f"{self.path}: {what} has unsupported value type {vtype.name}")


def _parse(buf, path: str):
    """Parse header, metadata and tensor records. Returns (version, metadata, types, records, data_offset)."""
    c = _Cursor(buf, path)
    c.need(HEADER_BYTES, "the header")
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    c.pos = HEADER_BYTES
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (expected one of {SUPPORTED_VERSIONS})")
    if n_kv * MIN_KV_BYTES > c.size:
        raise GGUFError(f"{path}: header claims {n_kv:,} metadata entries, more than a {c.size:,}-byte file can hold")
    if n_tensors * MIN_TENSOR_INFO_BYTES > c.size:
        raise GGUFError(f"{path}: header claims {n_tensors:,} tensors, more than a {c.size:,}-byte file can hold")
    metadata: dict[str, Any] = {}
    types: dict[str, list[GGUFValueType]] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.value_type(f"metadata key {shown(key)}")
        if key in metadata:
            raise GGUFError(f"{path}: metadata key {shown(key)} appears twice")
        start = c.pos
        metadata[key] = c.value(vtype, f"metadata key {shown(key)}")
        types[key] = [vtype]
        if vtype == GGUFValueType.ARRAY:
            types[key].append(GGUFValueType(struct.unpack_from("<I", buf, start)[0]))
    records = []
    for i in range(n_tensors):
        name = c.string(f"tensor record #{i}")
        where = f"{path}: tensor {shown(name)}"
        n_dims = c.scalar("<I", 4, where)
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise GGUFError(f"{where} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
        c.need(8 * n_dims, where)
        ne = list(struct.unpack_from(f"<{n_dims}Q", buf, c.pos))
        c.pos += 8 * n_dims
        raw_type = c.scalar("<I", 4, where)
        rel = c.scalar("<Q", 8, where)
        records.append((name, ne, raw_type, rel))
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if types.get("general.alignment", [GGUFValueType.UINT32]) != [GGUFValueType.UINT32] \
            or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: metadata key 'general.alignment' must be a power-of-two uint32, found {shown(alignment)}")
    data_offset = -(-c.pos // alignment) * alignment
    return version, metadata, types, records, alignment, data_offset


def _check_tensor(path: str, record, alignment: int, data_offset: int, file_size: int) -> "TensorInfo":
    name, ne, raw_type, rel = record
    where = f"{path}: tensor {shown(name)}"
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFError(f"{where} has unknown ggml type {raw_type}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise GGUFError(f"{where} has ggml type {qtype.name} with no known block layout")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if any(d <= 0 for d in ne):
        raise GGUFError(f"{where} has shape {ne} with an empty dimension")
    if ne[0] % block:
        raise GGUFError(f"{where} has row length {ne[0]}, not a multiple of {qtype.name}'s block of {block}")
    n_elements = 1
    for d in ne:
        n_elements *= d
    n_bytes = n_elements // block * type_size
    if rel % alignment:
        raise GGUFError(f"{where} data offset {rel:,} is not a multiple of the alignment {alignment}")
    start = data_offset + rel
    if start + n_bytes > file_size:
        raise GGUFError(f"{where} data [{start:,}, {start + n_bytes:,}) extends past the end of the file "
                        f"({file_size:,} bytes): truncated or corrupt file")
    return TensorInfo(name, qtype, tuple(reversed(ne)), n_elements, n_bytes, start)


class GGUFFile:
    """An open GGUF file: `metadata` (plain values), `tensors` (name -> TensorInfo), `raw(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise GGUFError(f"{self.path}: {'no such file' if e.errno == errno.ENOENT else e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            hf = os.path.isfile(os.path.join(self.path, "config.json"))
            raise GGUFError(f"{self.path}: is a folder, not a GGUF file" + (
                f" (a Hugging Face checkpoint: convert it with `qkvgguf convert {self.path}`, or describe it "
                f"with `qkvgguf inspect {self.path}`)" if hf else ""))
        if not stat.S_ISREG(st.st_mode):  # a FIFO, a device (/dev/zero), a socket: nothing to map
            raise GGUFError(f"{self.path}: not a regular file")
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
            if st.st_size < HEADER_BYTES:
                if head != GGUF_MAGIC:
                    raise GGUFError(f"{self.path}: not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
                raise GGUFError(f"{self.path}: truncated GGUF header ({st.st_size} bytes)")
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read ({e.strerror or type(e).__name__})") from None
        self.file_size = len(self._map)
        (self.version, self.metadata, self.metadata_types, records,
         self.alignment, self.data_offset) = _parse(memoryview(self._map), self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for record in records:
            if record[0] in self.tensors:
                raise GGUFError(f"{self.path}: tensor {shown(record[0])} appears twice")
            self.tensors[record[0]] = _check_tensor(self.path, record, self.alignment, self.data_offset, self.file_size)

    # -- metadata -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {shown(key)} is missing")
        return self.metadata[key]

    # -- tensors --------------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {shown(name)} not found")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only view of the memory map, shaped (rows, bytes per row).

        Float types come back as uint8 too; the quant registry turns bytes into values.
        """
        info = self.tensor(name)
        rows = info.n_elements // info.shape[-1]
        return self._map[info.offset:info.offset + info.n_bytes].reshape(rows, -1)

    @property
    def tensor_data_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"
