"""`qkvgguf run`: one prompt's completion, as llama-cli prints it (the chat loop is chat_repl.py).

    qkvgguf run -m M.gguf -p "Once upon a time" -n 64 --seed 7 -r "\n\n" --repeat-penalty 1.1
    qkvgguf run -f prompt.txt -n -1 --ignore-eos --json

The sampling seed is always printed (stderr) so that a good sample can be reproduced: without
--seed one is drawn and printed. --json prints one object (text, tokens, timings, seed, why it
stopped) instead of streaming the text.
"""

from __future__ import annotations

import json
import os
import secrets
import sys

from .errors import QkvggufError


def _log(msg: str) -> None:
    print(f"qkvgguf: {msg}", file=sys.stderr, flush=True)


def read_prompt(args) -> str:
    """The prompt from exactly one of: words on the command line, -p TEXT, -f FILE."""
    given = [name for name, v in (("the command line words", args.prompt), ("-p", args.prompt_opt),
                                  ("-f", args.file)) if v]
    if len(given) > 1:
        words = " ".join(args.prompt)
        raise QkvggufError(f"the prompt is given more than once ({' and '.join(given)}"
                           + (f": '{words}'" if args.prompt else "") + "); quote the whole prompt and give it once")
    if args.file is not None:
        if not os.path.isfile(args.file):
            raise QkvggufError(f"{args.file}: no such file (-f: the prompt file)")
        with open(args.file, encoding="utf-8", errors="replace") as f:
            return f.read()
    return args.prompt_opt if args.prompt_opt is not None else " ".join(args.prompt)


def check_sampling_flags(args) -> None:
    """The sampling flags' ranges, before any file is read (qkvgguf/flags.py)."""
    from .flags import check_sampling, number

    check_sampling(args.temp, args.top_k, args.top_p, args.min_p, None if args.seed == -1 else args.seed)
    number("--repeat-penalty", args.repeat_penalty, 0.0, lo_open=True)


def sampling_params(args, tok):
    """SamplingParams from the flags; the seed drawn here when none is given (so it can be printed)."""
    from .runtime.generate import SamplingParams

    if args.repeat_last_n < -1:
        raise QkvggufError(f"--repeat-last-n must be -1 (the context), 0 (off) or more, got {args.repeat_last_n}")
    seed = args.seed if args.seed is not None and args.seed >= 0 else secrets.randbits(32)  # -1: random, as llama.cpp
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=seed,
                          repeat_penalty=args.repeat_penalty,
                          repeat_last_n=args.repeat_last_n if args.repeat_last_n >= 0 else 1 << 62,
                          banned=frozenset(tok.eog_ids) if args.ignore_eos else frozenset())


def stop_strings(args) -> list[str]:
    """-r/--reverse-prompt and --stop, with \\n and \\t written as escapes understood (llama.cpp's -e)."""
    out = []
    for s in (args.reverse_prompt or []) + (args.stop or []):
        s = s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8") if "\\" in s else s
        if s:
            out.append(s)
    return out


def cmd_run(args, run_config, load, memory_report) -> int:
    from .runtime.generate import Sampler, Stats, generate_text

    prompt = read_prompt(args)
    if not args.chat and not prompt.strip():
        raise QkvggufError('empty prompt: give one as an argument, with -p "..." or -f FILE (or use --chat)')
    if args.n_predict < -1:
        raise QkvggufError(f"-n/--n-predict must be -1 (until the end or a full context) or more, got {args.n_predict}")
    check_sampling_flags(args)
    if args.chat_template_file is not None and not os.path.isfile(args.chat_template_file):
        raise QkvggufError(f"{args.chat_template_file}: no such file (--chat-template-file)")
    cfg = run_config(args)
    model, tok, n_ctx = load(cfg)
    params = sampling_params(args, tok)

    def announce_seed() -> None:  # once the prompt is ready: an error before it stays the only line
        _log(f"seed {params.seed} (--seed {params.seed} repeats this sample)")

    session = cfg.new_session(model, n_ctx)
    sampler = Sampler(params)
    stops = stop_strings(args)
    if args.chat:
        from .chat_repl import chat

        return chat(args, session, tok, sampler, prompt, stops, on_start=announce_seed)
    ids = tok.encode(prompt, add_special=True, parse_special=True)
    if len(ids) >= n_ctx:
        raise QkvggufError(f"the prompt has {len(ids)} tokens, more than the {n_ctx}-token context (-c)")
    stats = Stats()
    announce_seed()

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if not args.json:
        write(prompt)
    text, out_ids, stopped = generate_text(session, ids, args.n_predict, sampler, tok, stops, args.ignore_eos,
                                 None if args.json else write, stats)
    if args.json:
        print(json.dumps({"model": model.gguf.path, "prompt": prompt, "text": text, "prompt_tokens": ids,
                          "tokens": out_ids, "n_tokens": len(out_ids), "stop": stats.stop,
                          "stop_string": stopped, "seed": params.seed, "n_ctx": n_ctx,
                          "timings": stats.as_dict()}))
    else:
        write("\n")
    if args.verbose or args.stats:
        _log(stats.summary() + f"; stopped: {stats.stop}")
    if args.verbose and memory_report(model):
        _log(memory_report(model))
    return 0

