"""Gemma 3 270M Q4_K_M: our perplexity and greedy continuations next to llama.cpp's, same file.

    python benchmarks/gemma3_quality.py [--json benchmarks/results/gemma3_quality.json] [--no-perplexity]

Perplexity: War and Peace (tests/texts.py), first 60,000 characters, tokenized with BOS (ours and
llama.cpp's tokens are identical, checked here). Windows as llama.cpp's perplexity tool cuts them:
non-overlapping, each from an empty cache, BOS first, every token but the first scored; -c 512 over
2 windows and -c 2048 over 1 (at 2048 the 15 sliding-window layers run on their 768-row rings).
Ours: runtime.perplexity on the CPU (torch backend, f16 cache); llama.cpp: llama-cpp-python (f16
cache) with logits for every position.

Greedy: 64 tokens after 3 prompts, four ways:
- free-running, ours vs llama.cpp (each prefills the prompt, then decodes one token at a time);
- teacher-forced along llama.cpp's own continuation: at each of the 64 steps, our argmax and
  llama.cpp's decode argmax, given the same context; where they differ, llama.cpp's top-1 - top-2
  logit margin and what llama.cpp's prefill path (the same context as one batch) picks;
- against transformers in float32 on the file's weights dequantized (tests/hf_checkpoint.py
  gemma3_hf_folder), which has no activation quantization: free-running greedy, and the largest
  logit difference over the prompts (max|d| / max|ref|).
llama.cpp's CPU matmuls quantize activations (Q8_K / Q8_0 blocks) and differ between its batch and
single-token paths; on this model's flat distributions (top-2 gaps of a few hundredths) that noise
flips argmaxes, in llama.cpp itself too, so the float reference is transformers.
The perplexity and llama.cpp greedy checks are also tests/test_gemma3.py's slow tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import llamacpp  # noqa: E402
import texts  # noqa: E402
from qkvgguf import GGUFFile  # noqa: E402
from qkvgguf.default_model import demo_model_path  # noqa: E402
from qkvgguf.runtime import Model, Sampler, SamplingParams, Session, perplexity  # noqa: E402
from qkvgguf.tokenizer import Tokenizer  # noqa: E402

PROMPTS = [
    "Once upon a time, in a small village at the edge of the forest,",
    "The three most important things to know about the French Revolution are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


def llamacpp_greedy(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(llamacpp.last_logits(llm).argmax()))
        llm.eval([out[-1]])
    return out


def llamacpp_greedy_batch(llm, prompt, n):
    """llama.cpp's greedy continuation with every step evaluated as one batch from an empty cache (its
    prefill path), next to llamacpp_greedy's one-token decode path: where the two disagree,
    llama.cpp's own 8-bit activation rounding decides the token."""
    out = []
    for _ in range(n):
        llm.reset()
        llm.eval(list(prompt) + out)
        out.append(int(llamacpp.last_logits(llm).argmax()))
    return out


def first_difference(a: list[int], b: list[int]):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if a == b else min(len(a), len(b)))


def teacher_forced(model, llm, path: str, prompt: list[int], ref: list[int]) -> dict:
    """Along llama.cpp's continuation `ref`: our argmax vs llama.cpp's decode argmax at each step."""
    cache = model.new_cache(256, "f16", "f16")
    logits = model.forward(torch.tensor(prompt), cache)
    llm.reset()
    llm.eval(prompt)
    steps = []
    for k, t in enumerate(ref):
        theirs = torch.tensor(llamacpp.last_logits(llm))
        ours_top, (a, b) = int(logits.argmax()), theirs.topk(2).values.tolist()
        if ours_top != int(theirs.argmax()):
            llm_pre = llamacpp.load(path, n_ctx=256, n_batch=256)
            llm_pre.eval(prompt + ref[:k])
            steps.append({"step": k, "ours": ours_top, "llamacpp": int(theirs.argmax()),
                          "llamacpp_margin": round(a - b, 4),
                          "llamacpp_prefill_picks": int(llamacpp.last_logits(llm_pre).argmax()),
                          "ours_margin": round(float(logits.max() - logits[int(theirs.argmax())]), 4)})
            del llm_pre
        llm.eval([t])
        logits = model.forward(torch.tensor([t]), cache)
    return {"teacher_forced_agree": len(ref) - len(steps), "teacher_forced_steps": len(ref),
            "teacher_forced_differences": steps}


def transformers_model(path: str):
    """Gemma3ForCausalLM in float32 on the file's weights, dequantized (tests/hf_checkpoint.py)."""
    import tempfile

    import transformers

    from hf_checkpoint import gemma3_hf_folder

    folder = gemma3_hf_folder(path, tempfile.mkdtemp(prefix="gemma3-hf-"))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


@torch.no_grad()
def vs_transformers(model, hf, prompt: list[int], ours: list[int]) -> dict:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, max_new_tokens=len(ours), do_sample=False, top_p=None, top_k=None)[0, len(prompt):].tolist()
    seq = torch.tensor(prompt + ours[:-1])
    ref = hf(seq[None]).logits[0]
    got = model.forward(seq, model.new_cache(256, "f32", "f32"), logits="all")
    return {"identical_to_transformers": out == ours, "first_difference_transformers": first_difference(ours, out),
            "logits_rel_error_transformers": float((got - ref).abs().max() / ref.abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="default: the gemma3 demo model")
    p.add_argument("--json", default="benchmarks/results/gemma3_quality.json")
    p.add_argument("--no-perplexity", action="store_true", help="the greedy checks only")
    p.add_argument("--no-transformers", action="store_true", help="no float32 transformers reference")
    args = p.parse_args()
    path = args.model or demo_model_path("gemma3")
    gguf = GGUFFile(path)
    model, tok = Model(gguf, cache_bytes=1 << 30), Tokenizer.from_gguf(gguf)
    text = texts.war_and_peace()[:60_000]
    ids = tok.encode(text, add_special=True)
    vocab_llm = llamacpp.load(path, vocab_only=True)
    same_tokens = ids == [tok.bos_id] + llamacpp.tokenize(vocab_llm, text)
    res = {"model": os.path.basename(path), "text": "War and Peace [:60000]", "n_tokens": len(ids),
           "tokens_identical_to_llamacpp": same_tokens, "perplexity": [], "greedy": [],
           "command": "python benchmarks/gemma3_quality.py " + " ".join(sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    for n_ctx, n_windows in (() if args.no_perplexity else ((512, 2), (2048, 1))):
        t0 = time.perf_counter()
        ours = perplexity(model, ids[: n_ctx * n_windows], n_ctx, bos_id=tok.bos_id).ppl
        t1 = time.perf_counter()
        windows = [[tok.bos_id] + ids[i * n_ctx + 1:(i + 1) * n_ctx] for i in range(n_windows)]
        ref = llamacpp.perplexity(path, windows)
        row = {"n_ctx": n_ctx, "windows": n_windows, "scored": n_windows * (n_ctx - 1), "ours": round(ours, 4),
               "llamacpp": round(ref, 4), "ratio": round(ours / ref, 5), "ours_seconds": round(t1 - t0, 1)}
        print(row, flush=True)
        res["perplexity"].append(row)
    llm = llamacpp.load(path, n_ctx=256, n_batch=256)
    hf = transformers_model(path) if not args.no_transformers else None
    for prompt in PROMPTS:
        pids = tok.encode(prompt, add_special=True)
        ours = list(Session(model, n_ctx=256).generate(pids, 64, Sampler(SamplingParams(temperature=0))))
        ref = llamacpp_greedy(llm, pids, 64)
        batch = llamacpp_greedy_batch(llm, pids, 64)
        row = {"prompt": prompt, "identical_to_llamacpp": ours == ref,
               "first_difference_llamacpp": first_difference(ours, ref),
               "identical_to_llamacpp_batch_path": ours == batch,
               "first_difference_llamacpp_batch_path": first_difference(ours, batch),
               "llamacpp_paths_identical": ref == batch,
               "llamacpp_paths_first_difference": first_difference(ref, batch), "text": tok.decode(ours),
               "text_llamacpp": tok.decode(ref)}
        row.update(teacher_forced(model, llm, path, pids, ref))
        if hf is not None:
            row.update(vs_transformers(model, hf, pids, ours))
        print({k: v for k, v in row.items() if not k.startswith("text")}, flush=True)
        res["greedy"].append(row)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
