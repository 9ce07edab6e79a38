"""Importance matrix: per input column of every matmul, the mean of x^2 over calibration text.

    imatrix[name][j] = sum over calibration tokens t of x_t[j]^2 / count

where x_t is the activation row multiplied by weight `name` (GGUF name, e.g. blk.0.attn_q.weight;
the output matrix is `output.weight`, or `token_embd.weight` when tied). The quantizer weighs a
column's rounding error by it (qkvgguf/quants/weighted.py): a column that meets large inputs
contributes more to the output error.

Collection runs qkvgguf's own runtime (runtime/model.py) on a GGUF of the source weights: the
forward pass calls `ops.linear(x, W, name)` for every matmul, so a wrapper around the backend's
ops module sees every input. Text is cut into chunks of n_ctx tokens, each evaluated from an empty
cache (as llama-imatrix does).

Files use llama.cpp's imatrix GGUF layout (tools/imatrix/imatrix.cpp): general.type = "imatrix",
imatrix.datasets (array of strings), imatrix.chunk_count and imatrix.chunk_size (uint32), and per
weight two float32 tensors `<name>.in_sum2` (the sums, one row per expert) and `<name>.counts`
(the rows seen). `Imatrix.load` reads files made by llama-imatrix as well as ours.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from qkvgguf.errors import QkvggufError


class ImatrixError(QkvggufError):
    pass


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64 (n,) sum of x^2
    counts: dict[str, int] = field(default_factory=dict)  # name -> activation rows seen
    datasets: list[str] = field(default_factory=list)
    n_chunks: int = 0
    chunk_size: int = 0

    @property
    def values(self) -> dict[str, np.ndarray]:
        """name -> float32 (n,) mean x^2 (the importance the quantizers take)."""
        return {k: self.mean(k) for k in self.sums if self.counts.get(k, 0) > 0}

    @property
    def dataset(self) -> str:
        return "; ".join(self.datasets)

    @property
    def n_ctx(self) -> int:
        return self.chunk_size

    def mean(self, name: str) -> Optional[np.ndarray]:
        """float32 (n,) mean x^2 of the inputs of weight `name`, or None if never seen."""
        if name not in self.sums or self.counts.get(name, 0) == 0:
            return None
        return (self.sums[name] / self.counts[name]).astype(np.float32)

    def add(self, name: str, x) -> None:
        """Accumulate activation rows x (rows, n) (torch or numpy)."""
        x = np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
        x = x.reshape(-1, x.shape[-1])
        s = (x * x).sum(axis=0)
        if name in self.sums:
            self.sums[name] += s
            self.counts[name] += len(x)
        else:
            self.sums[name], self.counts[name] = s, len(x)

    def save(self, path: str | os.PathLike) -> None:
        """Write llama.cpp's imatrix GGUF (to a temporary file, then renamed)."""
        import gguf

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            w = gguf.GGUFWriter(str(tmp), arch="imatrix", use_temp_file=False)
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", self.datasets or ["unknown"])
            w.add_uint32("imatrix.chunk_count", self.n_chunks)
            w.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):
                w.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32)[None, :])
                w.add_tensor(f"{name}.counts", np.array([[self.counts[name]]], dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Imatrix":
        """Read an imatrix GGUF (ours or llama-imatrix's); one-line ImatrixError naming the file."""
        from qkvgguf.gguf_file import GGUFFile

        try:
            f = GGUFFile(str(path))
        except QkvggufError as e:
            raise ImatrixError(f"{path}: not a readable imatrix GGUF file ({e})") from None
        if f.metadata.get("general.type") != "imatrix":
            raise ImatrixError(f"{path}: general.type is {f.metadata.get('general.type')!r}, expected 'imatrix'")
        out = cls(datasets=list(f.metadata.get("imatrix.datasets", [])),
                  n_chunks=int(f.metadata.get("imatrix.chunk_count", 0)),
                  chunk_size=int(f.metadata.get("imatrix.chunk_size", 0)))
        for tname in f.tensors:
            if not tname.endswith(".in_sum2"):
                continue
            name = tname[: -len(".in_sum2")]
            if name + ".counts" not in f.tensors:
                raise ImatrixError(f"{path}: tensor '{tname}' has no '{name}.counts'")
            sums = _f32(f, tname, path).astype(np.float64).reshape(-1, f.tensors[tname].shape[-1])
            counts = _f32(f, name + ".counts", path).astype(np.float64).reshape(-1)
            if sums.ndim != 2 or sums.shape[0] != counts.shape[0]:
                raise ImatrixError(f"{path}: tensor '{tname}' {sums.shape} does not match its counts {counts.shape}")
            out.sums[name] = sums.sum(axis=0)  # experts folded together
            out.counts[name] = int(round(counts.sum()))
        if not out.sums:
            raise ImatrixError(f"{path}: no '<weight>.in_sum2' tensors")
        return out


def _f32(f, name: str, path) -> np.ndarray:
    from gguf import GGMLQuantizationType as T

    info = f.tensors[name]
    if info.type != T.F32:
        raise ImatrixError(f"{path}: tensor '{name}' is {info.type.name}, expected F32")
    return np.asarray(f.raw(name)).view(np.float32).reshape(info.shape)


def _recording_ops(ops, imatrix: Imatrix):
    """The backend ops module with `linear` recording its inputs."""
    rec = types.SimpleNamespace(**{k: getattr(ops, k) for k in dir(ops) if not k.startswith("__")})

    def linear(x, W, name, bias=None):
        imatrix.add(name, x)
        return ops.linear(x, W, name, bias)

    rec.linear = linear
    return rec


def chunking(n_tokens: int, n_ctx: int, bos_id: Optional[int], n_chunks: Optional[int]) -> tuple[int, int]:
    """(text tokens per chunk, chunks) for calibration over chunks of n_ctx tokens, BOS first when
    bos_id is given; ImatrixError when the text holds less than one chunk."""
    step = n_ctx - (bos_id is not None)
    total = n_tokens // step
    if n_chunks is not None:
        total = min(total, n_chunks)
    if total < 1:
        raise ImatrixError(f"the calibration text has {n_tokens} tokens, fewer than one chunk of {n_ctx}")
    return step, total


def collect_imatrix(gguf_path: str | os.PathLike, text: "str | list[int]", n_ctx: int = 512,
                    n_chunks: Optional[int] = None, bos_id: Optional[int] = None, dataset: str = "",
                    progress: Optional[Callable[[int, int], None]] = None, cache_bytes: int = 2 << 30) -> Imatrix:
    """Run the runtime over chunks of n_ctx tokens and collect x^2 sums.

    `text` is a string (tokenized with the GGUF's tokenizer; BOS starts each chunk when the model
    adds one) or token ids (BOS first when bos_id is given).
    """
    import torch

    from qkvgguf.gguf_file import GGUFFile
    from qkvgguf.runtime.model import Model

    gguf_file = GGUFFile(str(gguf_path))
    if isinstance(text, str):
        from qkvgguf.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(gguf_file)
        token_ids = tok.encode(text, add_special=False)
        if bos_id is None and tok.add_bos:
            bos_id = tok.bos_id
    else:
        token_ids = list(text)
    model = Model(gguf_file, cache_bytes=cache_bytes)
    step, total = chunking(len(token_ids), n_ctx, bos_id, n_chunks)
    imatrix = Imatrix(datasets=[dataset] if dataset else [], n_chunks=total, chunk_size=n_ctx)
    model.ops = _recording_ops(model.ops, imatrix)
    for c in range(total):
        chunk = token_ids[c * step:(c + 1) * step]
        if bos_id is not None:
            chunk = [bos_id] + chunk
        model.forward(torch.tensor(chunk), model.new_cache(n_ctx), logits="all")  # the output matmul sees all rows
        if progress is not None:
            progress(c + 1, total)
    return imatrix


def default_calibration_text() -> tuple[str, str]:
    """(name, text) of the calibration text shipped with the package (see qkvgguf/data/README.md)."""
    import qkvgguf

    path = Path(qkvgguf.__file__).resolve().parent / "data" / "calibration.txt"
    if not path.is_file():
        raise ImatrixError(f"{path}: the packaged calibration text is missing (reinstall qkvgguf)")
    return "qkvgguf/data/calibration.txt (The Adventures of Sherlock Holmes, public domain)", path.read_text("utf-8")
