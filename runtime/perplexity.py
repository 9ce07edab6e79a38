"""Perplexity over non-overlapping windows, its standard error, and KL divergence against a saved run.

The token stream is cut into windows of `n_ctx` tokens (a trailing partial window is dropped).
Each window is evaluated from an empty cache; every token of the window except the first is
scored by the logits of the position before it. With `bos_id`, the first token of every window is
replaced by BOS, as llama.cpp's perplexity tool does for models that add BOS.

    nll_i = -log p(token_i | window prefix)            for the N scored tokens
    NLL = mean_i nll_i;  PPL = exp(NLL)
    SE(NLL) = s / sqrt(N),  s = sqrt(sum_i (nll_i - NLL)^2 / (N - 1))   (sample standard deviation)
    SE(PPL) = PPL * SE(NLL)                                           (delta method: d exp(x)/dx = exp(x))

This is the `PPL = x +/- y` of llama-perplexity (it computes sqrt((mean nll^2 - NLL^2) / (N - 1)),
the same number), so the two can be compared. It treats the tokens as independent; tokens of one
window are not, so it is a lower bound on the real uncertainty of the text's perplexity. To tell two
configurations apart on the same text, use the KL divergence below rather than two overlapping
+/- intervals.

KL divergence (llama-perplexity's --kl-divergence-base / --kl-divergence): a base run saves, for every
scored token, the log-softmax over the full vocabulary (`LogprobWriter`); another run (other weights
or cache types, same text, same -c) reads it back (`SavedLogprobs`) and, per scored token,

    KLD_i = sum_v p_base(v) (log p_base(v) - log p_this(v))     over the whole vocabulary
    same top_i = argmax_v p_base(v) == argmax_v p_this(v)

with both sides' log-probabilities rounded to float16 as stored (identical runs give exactly 0).

Saved file format (version 1): an uncompressed NumPy .npz, i.e. a zip of .npy members, readable
with `np.load(FILE, allow_pickle=False)`; nothing in it is ever unpickled:

    meta.npy      int64 [version, n_ctx, n_vocab, n_scored]
    tokens.npy    int32 (n_windows * n_ctx,)  the token ids scored, as tokenized (before the BOS swap)
    logprobs.npy  float16 (n_scored, n_vocab)  log-softmax of each scored position, in scoring order
    nll.npy       float64 (n_scored,)          the base run's nll_i (its PPL without float16 rounding)

`logprobs.npy` is 2 * n_vocab bytes per scored token (SmolLM2: 96 KiB; 1M tokens of a 150k vocab:
300 GB), about what llama.cpp's own uint16 files take. It is written while the run goes, to
FILE.tmp<pid>, and renamed to FILE only once complete; the reader streams it window by window.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from qkvgguf.errors import QkvggufError

from .model import Model

LOGITS_FORMAT_VERSION = 1
_MEMBERS = ("meta.npy", "tokens.npy", "logprobs.npy", "nll.npy")


@dataclass(frozen=True)
class PerplexityResult:
    nll: float
    ppl: float
    n_scored: int
    n_windows: int
    n_ctx: int
    nll_stderr: float = math.nan  # standard error of the mean NLL (see the module docstring)
    ppl_stderr: float = math.nan  # ppl * nll_stderr
    token_nll: np.ndarray = field(default=None, compare=False, repr=False)  # float64 (n_scored,)


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean: sample standard deviation / sqrt(N) (nan for fewer than 2 values)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan
    return float(values.std(ddof=1) / math.sqrt(values.size))


def token_nll(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """-log p(targets[t]) under logits[t] (T, vocab), float32 on the logits' device.

    logsumexp(logits) - logits[target] in float32: no T x vocab float64 copy (the VRAM planner
    budgets one float32 logits matrix); callers sum in float64.
    """
    lp = logits.float()
    ids = torch.tensor(targets, dtype=torch.long, device=lp.device)
    return torch.logsumexp(lp, dim=-1) - lp.gather(1, ids.unsqueeze(1)).squeeze(1)


LogprobSink = Callable[[torch.Tensor, list], None]  # (log-softmax rows (T, vocab) float32, their targets)


def window_token_nll(model: Model, window: list[int], cache, n_batch: int = 512,
                     on_logprobs: LogprobSink | None = None) -> torch.Tensor:
    """-log p of tokens 1..n-1 of one window, float64 on the CPU, evaluated into an empty `cache`.

    on_logprobs, when given, receives the log-softmax of every scored position in order, chunk by
    chunk (an extra T x vocab float32 matrix per chunk, only then).
    """
    out = []
    prev_logits = None  # logits of the position before the current chunk
    for start in range(0, len(window), n_batch):
        chunk = window[start:start + n_batch]
        logits = model.forward(torch.tensor(chunk), cache, logits="all")  # (T, vocab)
        if prev_logits is not None:
            logits = torch.cat([prev_logits[None], logits])
            targets = chunk
        else:
            targets = chunk[1:]
        scored = logits[: len(targets)]
        if targets:
            out.append(token_nll(scored, targets).double().cpu())
            if on_logprobs is not None:
                lp = scored.float()
                on_logprobs(lp - torch.logsumexp(lp, dim=-1, keepdim=True), targets)
        prev_logits = logits[-1]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def window_nll(model: Model, window: list[int], n_batch: int = 512, type_k: str = "f16",
               type_v: str = "f16") -> tuple[float, int]:
    """Sum of -log p over tokens 1..n-1 of one window, and how many tokens that is."""
    nll = window_token_nll(model, window, model.new_cache(len(window), type_k, type_v), n_batch)
    return float(nll.sum()), nll.numel()


def perplexity(
    model: Model,
    tokens: list[int],
    n_ctx: int,
    bos_id: int | None = None,
    n_batch: int = 512,
    progress: Callable[[int, float], None] | None = None,
    type_k: str = "f16",
    type_v: str = "f16",
    new_cache: Callable[[int], object] | None = None,
    on_logprobs: LogprobSink | None = None,
) -> PerplexityResult:
    """type_k / type_v: the KV cache types (runtime/kv_cache.py), f16 by default as llama.cpp.

    new_cache(n_ctx), when given, makes each window's cache instead (the CLI passes its RunConfig's,
    so the cache types come from the one place that reads the flags); on_logprobs: see
    window_token_nll (LogprobWriter saves them, KLDivergence compares them).
    """
    if n_ctx < 2:
        raise QkvggufError(f"perplexity needs a context of at least 2 tokens, got -c {n_ctx}")
    n_windows = len(tokens) // n_ctx
    if n_windows == 0:
        raise QkvggufError(f"the text has {len(tokens)} tokens, fewer than one window of -c {n_ctx}")
    if new_cache is None:
        def new_cache(n):
            return model.new_cache(n, type_k, type_v)
    parts, total, count = [], 0.0, 0
    for w in range(n_windows):
        window = tokens[w * n_ctx:(w + 1) * n_ctx]
        if bos_id is not None:
            window = [bos_id] + window[1:]
        nll = window_token_nll(model, window, new_cache(len(window)), n_batch, on_logprobs)
        parts.append(nll)
        total += float(nll.sum())
        count += nll.numel()
        if progress is not None:
            progress(w + 1, math.exp(total / count))
    per_token = torch.cat(parts).numpy()
    nll = total / count
    se = standard_error(per_token)
    return PerplexityResult(nll=nll, ppl=math.exp(nll), n_scored=count, n_windows=n_windows, n_ctx=n_ctx,
                            nll_stderr=se, ppl_stderr=math.exp(nll) * se, token_nll=per_token)


def scored_count(n_tokens: int, n_ctx: int) -> int:
    """How many tokens `perplexity` scores in n_tokens (whole windows only, first of each unscored)."""
    return (n_tokens // n_ctx) * (n_ctx - 1)


# -- saving and comparing log-probabilities (KL divergence) ---------------------------------------

def _write_member(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


class LogprobWriter:
    """Saves a base run's log-probabilities (format in the module docstring): pass it as
    `perplexity(..., on_logprobs=writer)`, then `finish(result)`; `abort()` on failure.

    The file appears at `path` only when complete: a crash leaves at most FILE.tmp<pid>."""

    def __init__(self, path: str, tokens: list[int], n_ctx: int, n_vocab: int):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise QkvggufError(f"--save-logits {path}: the folder {parent} does not exist")
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.n_vocab, self.n_scored = n_vocab, scored_count(len(tokens), n_ctx)
        self.rows = 0
        try:
            self.zf = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        except OSError as e:
            raise QkvggufError(f"--save-logits {path}: cannot write {self.tmp}: {e.strerror or e}") from None
        meta = np.array([LOGITS_FORMAT_VERSION, n_ctx, n_vocab, self.n_scored], dtype=np.int64)
        _write_member(self.zf, "meta.npy", meta)
        _write_member(self.zf, "tokens.npy", np.asarray(tokens[: (len(tokens) // n_ctx) * n_ctx], dtype=np.int32))
        self.member = self.zf.open("logprobs.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.member, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f2")),
                                                           "fortran_order": False,
                                                           "shape": (self.n_scored, n_vocab)})

    def __call__(self, logprobs: torch.Tensor, targets: list[int]) -> None:
        if logprobs.shape[1] != self.n_vocab:
            raise QkvggufError(f"--save-logits {self.path}: logits have {logprobs.shape[1]} columns, "
                               f"expected the vocabulary's {self.n_vocab}")
        self.member.write(logprobs.to(torch.float16).cpu().numpy().astype("<f2", copy=False).tobytes())
        self.rows += logprobs.shape[0]

    def finish(self, result: PerplexityResult) -> None:
        if self.rows != self.n_scored or result.n_scored != self.n_scored:
            self.abort()
            raise QkvggufError(f"--save-logits {self.path}: wrote {self.rows} rows, expected {self.n_scored}")
        self.member.close()
        _write_member(self.zf, "nll.npy", np.asarray(result.token_nll, dtype=np.float64))
        self.zf.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError, ValueError, zipfile.BadZipFile):  # already broken: the temp file matters
            self.member.close()
            self.zf.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class SavedLogprobs:
    """A file written by LogprobWriter, opened for comparison: checks it, then streams its rows.

    Every problem with the file (missing, not a zip, a member missing or cut short, a pickled or
    wrongly typed array, another text or -c) is a one-line QkvggufError naming it."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise QkvggufError(f"--kl-divergence {path}: no such file")
        try:
            self.zf = zipfile.ZipFile(path)
            missing = [m for m in _MEMBERS if m not in self.zf.namelist()]
            if missing:
                self._bad(f"members {', '.join(missing)} missing")
            meta = self._small("meta.npy", np.int64, (4,))
            self.version, self.n_ctx, self.n_vocab, self.n_scored = (int(x) for x in meta)
            if self.version != LOGITS_FORMAT_VERSION:
                self._bad(f"format version {self.version}, this qkvgguf reads {LOGITS_FORMAT_VERSION}")
            self.tokens = self._small("tokens.npy", np.int32, None)
            self.nll = self._small("nll.npy", np.float64, (self.n_scored,))
            if self.n_ctx < 2 or self.tokens.ndim != 1 or scored_count(self.tokens.size, self.n_ctx) != self.n_scored:
                self._bad(f"{self.tokens.size} tokens and -c {self.n_ctx} do not make {self.n_scored} scored tokens")
            self.member = self.zf.open("logprobs.npy")
            version = np.lib.format.read_magic(self.member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(self.member)
            if dtype != np.dtype("<f2") or fortran or shape != (self.n_scored, self.n_vocab):
                self._bad(f"logprobs.npy is {dtype} {shape}, expected float16 {(self.n_scored, self.n_vocab)}")
            size = self.zf.getinfo("logprobs.npy").file_size
            if size != self.member.tell() + 2 * self.n_scored * self.n_vocab:
                self._bad(f"logprobs.npy has {size:,} bytes, its header says "
                          f"{self.member.tell() + 2 * self.n_scored * self.n_vocab:,}")
        except QkvggufError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError) as e:
            self._bad(str(e))
        self.rows = 0

    def _bad(self, why: str):
        why = " ".join(str(why).split())  # one line, whatever the library said
        raise QkvggufError(f"--kl-divergence {self.path}: not a complete --save-logits file ({why})")

    def _small(self, name: str, dtype, shape) -> np.ndarray:
        with self.zf.open(name) as f:
            a = np.lib.format.read_array(f, allow_pickle=False)
        if a.dtype != np.dtype(dtype) or (shape is not None and a.shape != shape):
            self._bad(f"{name} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape or '(n,)'}")
        return a

    def check(self, tokens: list[int], n_ctx: int, n_vocab: int) -> None:
        """The run about to be compared scores the same tokens with the same windows and vocabulary."""
        ours = np.asarray(tokens[: (len(tokens) // n_ctx) * n_ctx], dtype=np.int64)
        where = f"--kl-divergence {self.path}"
        if n_ctx != self.n_ctx:
            raise QkvggufError(f"{where}: saved with -c {self.n_ctx}, this run uses -c {n_ctx} (use the same -c)")
        if n_vocab != self.n_vocab:
            raise QkvggufError(f"{where}: saved with a vocabulary of {self.n_vocab}, this model has {n_vocab}")
        if ours.size != self.tokens.size:
            raise QkvggufError(f"{where}: saved over {self.tokens.size:,} tokens, this run has {ours.size:,} "
                               f"(same text and --chunks needed)")
        diff = np.flatnonzero(ours != self.tokens)
        if diff.size:
            i = int(diff[0])
            raise QkvggufError(f"{where}: token {i} is {ours[i]} here, {self.tokens[i]} in the file "
                               f"(a different text or tokenizer)")

    def read(self, n: int) -> np.ndarray:
        """The next n saved rows, float16 (n, n_vocab)."""
        want = n * self.n_vocab * 2
        try:
            data = self.member.read(want)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            self._bad(str(e))
        if len(data) != want or self.rows + n > self.n_scored:
            self._bad(f"logprobs.npy ends after {self.rows + len(data) // (2 * self.n_vocab)} rows")
        self.rows += n
        return np.frombuffer(bytearray(data), dtype="<f2").reshape(n, self.n_vocab)

    def close(self) -> None:
        self.zf.close()


@dataclass(frozen=True)
class KLDResult:
    n_tokens: int
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top_pct: float
    same_top_stderr_pct: float
    base_nll: float
    base_ppl: float
    base_ppl_stderr: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def token_kld(base: torch.Tensor, this: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored token, from two log-softmax matrices (T, vocab): KL(base || this) over the full
    vocabulary (float64, on the CPU) and whether both put the same token on top (bool)."""
    base, this = base.float(), this.float()
    return (base.exp() * (base - this)).sum(-1).double().cpu(), (base.argmax(-1) == this.argmax(-1)).cpu()


def kld_summary(kld: np.ndarray, same: np.ndarray) -> dict:
    """Mean per-token KLD with its standard error, median, 99th percentile and maximum, and the
    same-top-token percentage with its standard error (what llama-perplexity reports)."""
    kld, same = np.asarray(kld, dtype=np.float64), np.asarray(same, dtype=np.float64)
    return dict(n_tokens=int(kld.size), kld_mean=float(kld.mean()), kld_stderr=standard_error(kld),
                kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()),
                same_top_pct=100 * float(same.mean()), same_top_stderr_pct=100 * standard_error(same))


class KLDivergence:
    """Compares a run with a saved base run (formulas in the module docstring): pass it as
    `perplexity(..., on_logprobs=kld)`, then `result()`."""

    def __init__(self, saved: SavedLogprobs):
        self.saved = saved
        self.kld: list[torch.Tensor] = []
        self.same: list[torch.Tensor] = []

    def __call__(self, logprobs: torch.Tensor, targets: list[int]) -> None:
        base = torch.from_numpy(self.saved.read(logprobs.shape[0])).to(logprobs.device)
        kld, same = token_kld(base, logprobs.to(torch.float16))  # this run rounded as the base was
        self.kld.append(kld)
        self.same.append(same)

    def result(self) -> KLDResult:
        if self.saved.rows != self.saved.n_scored:
            self.saved._bad(f"compared {self.saved.rows} of its {self.saved.n_scored} rows")
        base = self.saved.nll
        base_nll, base_se = float(base.mean()), standard_error(base)
        return KLDResult(**kld_summary(torch.cat(self.kld).numpy(), torch.cat(self.same).numpy()), base_nll=base_nll,
                         base_ppl=math.exp(base_nll), base_ppl_stderr=math.exp(base_nll) * base_se)
