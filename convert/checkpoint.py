"""Reading a Hugging Face checkpoint folder: config.json and weights, one tensor at a time.

Weights come from, in this order of preference:
- `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- `pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json`, read only through
  `torch.load(weights_only=True, mmap=True)` (no pickled code runs, pages load on demand).

A safetensors file is validated before any tensor is read (we parse its header ourselves):

    u64 header length N | N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}} | data

- N must fit in the file and the JSON must parse to an object of tensor records;
- each record: a known dtype, a shape of non-negative integers, integer `data_offsets` whose span
  equals prod(shape) * dtype size; `8 + N + end` must not pass the end of the file (a truncated
  download names the first tensor it cut);
- the records tile the data exactly: no overlaps, no holes (the safetensors library's own rule);
- shard names in an index are plain file names inside the folder.
Tensor bytes are then read lazily with plain file reads into a fresh tensor, so holding a
`Checkpoint` costs nothing and `load(name)` costs one tensor. (Not a memory map: the pages of a
map that were read stay in the process's resident set until it is closed, so converting through
one would grow RSS by the whole checkpoint; read pages stay in the OS page cache only.)
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkvgguf.errors import QkvggufError, shown


class CheckpointError(QkvggufError):
    """The Hugging Face folder is missing a file, or a weights file is malformed or truncated."""


# safetensors dtype -> bytes per element
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_DIMS = 8


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    shape: tuple[int, ...]  # PyTorch order
    dtype: str  # as the file spells it: "F32", "BF16", "torch.float16", ...
    offset: int = -1  # safetensors: the tensor's first byte in the file


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 (byte {e.start:,})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and validate a safetensors header; returns its tensors by name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: safetensors file has {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header: length {n:,} but the file has {size:,} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header: not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    refs = {}
    spans = []
    data_size = size - 8 - n
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {shown(name)}"
        if not isinstance(rec, dict):
            raise CheckpointError(f"{where}: header record is {type(rec).__name__}, expected an object")
        dtype, shape, offsets = rec.get("dtype"), rec.get("shape"), rec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: dtype {shown(dtype)} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
                not all(_is_int(d) and 0 <= d < 2**40 for d in shape):
            raise CheckpointError(f"{where}: shape {shown(shape)} is not a list of at most {MAX_DIMS} "
                                  "non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets {shown(offsets)} is not a pair of integers")
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{where} spans {end - begin:,} bytes, expected {expected:,} "
                                  f"for {dtype} {tuple(shape)}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {shown(name)} ends at byte {8 + n + end:,} "
                                  f"but the file has {size:,} bytes")
        spans.append((begin, end, name))
        refs[name] = TensorRef(name, path, tuple(shape), dtype, 8 + n + begin)
    spans.sort()
    pos = 0  # the data must be covered exactly, without overlaps or holes (as the safetensors library checks)
    for begin, end, name in spans:
        if begin != pos:
            raise CheckpointError(f"{path}: tensor {shown(name)} starts at data byte {begin:,}, expected {pos:,} "
                                  f"({'overlaps the tensor before it' if begin < pos else 'a hole before it'}): "
                                  "corrupt header")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path}: the tensors cover {pos:,} of the {data_size:,} data bytes: corrupt header")
    return refs


class Checkpoint:
    """A Hugging Face model folder: `config` (dict) and lazily read tensors."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a directory")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing (a Hugging Face model folder needs config.json)")
        self.config: dict[str, Any] = read_json(config_path)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        self._open: dict[Path, Any] = {}  # safetensors file -> open binary file
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}  # .bin file -> mapped state dict
        self.tensors: dict[str, TensorRef] = self._index()

    # -- discovery -------------------------------------------------------------------------------

    def _shards(self, index_name: str) -> list[Path]:
        index_path = self.folder / index_name
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' of tensor names to shard files")
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in Path(shard).parts:
                raise CheckpointError(f"{index_path}: shard name {shown(shard)} is not a file name in the folder")
            if not (self.folder / shard).is_file():
                raise CheckpointError(f"{self.folder / shard}: shard named in {index_name} is missing")
        return [self.folder / s for s in shards]

    def _index(self) -> dict[str, TensorRef]:
        f = self.folder
        if (f / "model.safetensors.index.json").is_file():
            files, kind = self._shards("model.safetensors.index.json"), "safetensors"
        elif (f / "model.safetensors").is_file():
            files, kind = [f / "model.safetensors"], "safetensors"
        elif (f / "pytorch_model.bin.index.json").is_file():
            files, kind = self._shards("pytorch_model.bin.index.json"), "bin"
        elif (f / "pytorch_model.bin").is_file():
            files, kind = [f / "pytorch_model.bin"], "bin"
        else:
            raise CheckpointError(f"{f}: no weights found (expected model.safetensors, "
                                  "model.safetensors.index.json or pytorch_model.bin)")
        refs: dict[str, TensorRef] = {}
        for path in files:
            found = safetensors_header(path) if kind == "safetensors" else self._bin_refs(path)
            for name, ref in found.items():
                if name in refs:
                    raise CheckpointError(f"{path}: tensor '{name}' is also in {refs[name].file.name}")
                refs[name] = ref
        return refs

    def _bin_refs(self, path: Path) -> dict[str, TensorRef]:
        state = self._torch_load(path)
        return {name: TensorRef(name, path, tuple(t.shape), str(t.dtype)) for name, t in state.items()}

    def _torch_load(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bins:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle errors, zip errors, refused globals: all mean a bad file
                raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): "
                                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path}: expected a state dict of tensors")
            self._bins[path] = state
        return self._bins[path]

    # -- reading ---------------------------------------------------------------------------------

    def load(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype (a copy for safetensors; a mapped view for .bin)."""
        ref = self.tensors[name]
        if ref.file.suffix == ".bin":
            return self._torch_load(ref.file)[name]
        f = self._open.get(ref.file)
        if f is None:
            try:
                f = self._open[ref.file] = open(ref.file, "rb")
            except OSError as e:
                raise CheckpointError(f"{ref.file}: cannot open ({e.strerror})") from None
        tensor = torch.empty(ref.shape, dtype=TORCH_DTYPES[ref.dtype])
        buf = memoryview(tensor.view(-1).view(torch.uint8).numpy())  # little-endian, as safetensors stores
        f.seek(ref.offset)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:  # the file shrank after its header was checked
                raise CheckpointError(f"{ref.file}: truncated: tensor '{name}' ends at byte "
                                      f"{ref.offset + len(buf):,} but reading stopped at {ref.offset + done:,}")
            done += n
        return tensor

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        self._bins.clear()
