"""`qkvgguf run --chat`: a conversation through the file's chat template (or --chat-template-file).

On a terminal it behaves as llama-cli's conversation mode:
- a banner says how to leave; the prompt is `> `;
- `/exit` (or `/quit`) and Ctrl-D on an empty line end the chat with exit status 0 and a newline;
- Ctrl-C during a reply stops that reply only (what was said so far stays in the conversation) and
  the next turn works; Ctrl-C at the prompt leaves (status 130).
When stdin is not a terminal (`--chat-stdin`, pipes), each line is a user turn, echoed as `> TEXT`
before its reply, with a blank line between turns, so a transcript reads as one. A single prompt
(`--chat -p TEXT` without --chat-stdin) prints its reply only, as `run` without --chat does, so a
script gets the answer and nothing else.
"""

from __future__ import annotations

import os
import sys

from .errors import QkvggufError

EXIT_COMMANDS = ("/exit", "/quit")


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(args, session, tok, sampler, first: str, stops: list[str], on_start=None) -> int:
    """The REPL; on_start() runs once the chat template has rendered a probe conversation (run prints the
    seed there, so a template that fails is the only line on stderr)."""
    from .runtime.generate import Stats, generate_text

    if args.chat_template_file is not None:
        with open(args.chat_template_file, encoding="utf-8") as f:
            tok.chat_template = f.read()
    if not tok.chat_template:
        raise QkvggufError(f"{args.model or 'the model'} has no tokenizer.chat_template: --chat needs one "
                           "(or give one with --chat-template-file FILE)")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    tok.render_chat(messages + [{"role": "user", "content": "Hello"}], add_generation_prompt=True)  # fails here, first
    if on_start is not None:
        on_start()
    interactive = sys.stdin.isatty()
    if interactive:
        name = os.path.basename(args.model) if args.model else "the default model"
        print(f"qkvgguf: chatting with {name}. Type a message and press Enter. /exit or Ctrl-D leaves; "
              "Ctrl-C stops a reply.", file=sys.stderr, flush=True)
    pending = first.strip() or None
    transcript = not first.strip() or args.chat_stdin  # turns may come from stdin: mark each
    turns = 0
    while True:
        if pending is None:
            if not interactive and first.strip() and not args.chat_stdin and turns:
                break
            try:
                pending = input("> " if interactive else "")
            except EOFError:
                if interactive:
                    _say("\n")  # the cursor was after "> "
                break
            except KeyboardInterrupt:
                _say("\n")
                raise
            if pending.strip() in EXIT_COMMANDS:
                break
            if not pending.strip():
                pending = None
                continue
        if not interactive and transcript:
            _say(("\n" if turns else "") + f"> {pending}\n")
        messages.append({"role": "user", "content": pending})
        pending = None
        turns += 1
        text = tok.render_chat(messages, add_generation_prompt=True)
        ids = tok.encode(text, add_special=True, parse_special=True)
        if len(ids) >= session.n_ctx:
            raise QkvggufError(f"the conversation has {len(ids)} tokens, more than the {session.n_ctx}-token context")
        stats = Stats()
        reply: list[str] = []

        def write(piece: str) -> None:
            reply.append(piece)
            _say(piece)

        try:
            generate_text(session, ids, args.n_predict, sampler, tok, stops, args.ignore_eos, write, stats)
            _say("\n")
        except KeyboardInterrupt:  # stop this reply only; what was said stays in the conversation
            _say("\n")
            print("qkvgguf: (reply stopped)", file=sys.stderr, flush=True)
            if not interactive:
                raise
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.verbose or args.stats:
            print(f"qkvgguf: {stats.summary()}", file=sys.stderr, flush=True)
    return 0
