"""qkvgguf's Gemma 3 converter vs llama.cpp's convert_hf_to_gguf.py on the same checkpoints: keys and bytes.

    python benchmarks/convert_gemma3_vs_llamacpp.py [--llama-cpp DIR] [--work DIR] [--gemma3-gguf PATH]
        [--outtypes f32,f16,q8_0] [--json benchmarks/results/convert_gemma3_vs_llamacpp.json]

Checkpoints (built in --work):
- `tiny`: tests/gemma3_checkpoint.py's random Gemma3ForCausalLM (7 layers, window 6, vocab 512), f32;
- `tiny-bf16`, `tiny-f16`: the same weights saved as bf16 / f16 (Google ships bf16);
- `tiny-multimodal`: a Gemma3ForConditionalGeneration (tiny SigLIP tower) holding the same language
  model;
- `real-270m` (with --gemma3-gguf PATH, the Gemma 3 270M Q4_K_M file): rebuilt as a Hugging Face
  folder by tests/hf_checkpoint.gemma3_hf_folder (f32, 262,144-token SentencePiece vocabulary).

For each checkpoint and outtype: ours (`qkvgguf.convert.convert`) and llama.cpp's
`convert_hf_to_gguf.py` (from the llama-cpp-python source distribution, run with its own gguf-py
on PYTHONPATH), then per file pair: keys only in one, keys whose value or type differs, and the
tensors whose type, shape or bytes differ (with the largest difference for float tensors).
Both converters write general.name from the folder name in their own spelling and llama.cpp adds
general.basename and general.size_label (also from the folder name and the parameter count); those
keys and our `qkvgguf.*` keys are listed but not counted as differences.

llama.cpp's sources: --llama-cpp DIR (its vendor/llama.cpp), else `pip download --no-deps
--no-binary :all: llama-cpp-python==<installed version>` into --work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

NOT_COUNTED = ("general.name", "general.basename", "general.size_label", "qkvgguf.")


def llama_cpp_dir(arg: str | None, work: Path) -> Path:
    if arg:
        return Path(arg)
    import llama_cpp

    version = llama_cpp.__version__
    found = next(work.glob(f"llama_cpp_python-{version}/vendor/llama.cpp"), None)
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(work)], check=True)
    with tarfile.open(next(work.glob(f"llama_cpp_python-{version}.tar.gz"))) as tar:
        tar.extractall(work, filter="data")
    return work / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def checkpoints(work: Path, gemma3_gguf: str | None) -> dict[str, Path]:
    import torch
    import transformers as tf

    import gemma3_checkpoint

    out = {}
    tiny = work / "tiny"
    if not (tiny / "config.json").exists():
        gemma3_checkpoint.gemma3_folder(tiny)
    out["tiny"] = tiny
    tok = [tiny / n for n in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json")]
    for dtype in ("bf16", "f16"):
        folder = work / f"tiny-{dtype}"
        if not (folder / "config.json").exists():
            model = gemma3_checkpoint.model(0).to({"bf16": torch.bfloat16, "f16": torch.float16}[dtype])
            model.save_pretrained(str(folder))
            for f in tok:
                shutil.copy(f, folder / f.name)
        out[f"tiny-{dtype}"] = folder
    mm = work / "tiny-multimodal"
    if not (mm / "config.json").exists():
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=4)
        cfg = tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**gemma3_checkpoint.CONFIG), vision_config=vision,
                              mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=4)
        model = tf.Gemma3ForConditionalGeneration(cfg)
        model.model.language_model.load_state_dict(gemma3_checkpoint.model(0).model.state_dict())
        model.save_pretrained(str(mm))
        for f in tok:
            shutil.copy(f, mm / f.name)
    out["tiny-multimodal"] = mm
    if gemma3_gguf:
        from hf_checkpoint import gemma3_hf_folder

        real = work / "real-270m"
        if not (real / "config.json").exists():
            gemma3_hf_folder(gemma3_gguf, real)
        out["real-270m"] = real
    return out


def fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: ([t.name for t in f.types], f.contents()) for k, f in GGUFReader(path).fields.items()
            if not k.startswith("GGUF.")}


def compare(ours: Path, ref: Path) -> dict:
    from gguf import GGUFReader

    a, b = fields(ours), fields(ref)
    counted = lambda k: not k.startswith(NOT_COUNTED)  # noqa: E731
    ta = {t.name: t for t in GGUFReader(ours).tensors}
    tb = {t.name: t for t in GGUFReader(ref).tensors}
    differing = {}
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            differing[name] = (f"{x.tensor_type.name} {list(map(int, x.shape))} vs "
                               f"{y.tensor_type.name} {list(map(int, y.shape))}")
        elif not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
            note = "bytes"
            if x.tensor_type.name in ("F32", "F16"):
                d = np.abs(np.asarray(x.data, np.float64) - np.asarray(y.data, np.float64)).max()
                note = f"max |d| {float(d):.3g}"
            differing[name] = note
    return {
        "keys_only_ours": sorted(k for k in set(a) - set(b) if counted(k)),
        "keys_only_llamacpp": sorted(k for k in set(b) - set(a) if counted(k)),
        "keys_differing": sorted(k for k in set(a) & set(b) if counted(k) and a[k] != b[k]),
        "keys_not_counted": sorted(k for k in set(a) ^ set(b) | {k for k in set(a) & set(b) if a[k] != b[k]}
                                   if not counted(k)),
        "tensors": len(tb),
        "tensor_names_only_one_side": sorted(set(ta) ^ set(tb)),
        "tensors_differing": len(differing),
        "differing": dict(list(differing.items())[:8]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", help="llama.cpp source folder (vendor/llama.cpp of the sdist)")
    ap.add_argument("--work", default="/tmp/qkvgguf-gemma3-convert")
    ap.add_argument("--gemma3-gguf", help="the Gemma 3 270M GGUF, to rebuild and convert back (real-270m)")
    ap.add_argument("--outtypes", default="f32,f16,q8_0")
    ap.add_argument("--json", default=str(HERE / "results" / "convert_gemma3_vs_llamacpp.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = llama_cpp_dir(args.llama_cpp, work)
    from qkvgguf.convert import convert

    rows = []
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    for name, folder in checkpoints(work, args.gemma3_gguf).items():
        for outtype in args.outtypes.split(","):
            ours, ref = work / f"{name}-{outtype}-ours.gguf", work / f"{name}-{outtype}-llamacpp.gguf"
            convert(folder, ours, outtype, force=True)
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
                            "--outfile", str(ref)], check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            row = {"checkpoint": name, "outtype": outtype, **compare(ours, ref)}
            rows.append(row)
            print(f"{name:16s} {outtype:5s} tensors differing {row['tensors_differing']:3d} / {row['tensors']:3d}   "
                  f"keys: only ours {row['keys_only_ours']}, only llama.cpp {row['keys_only_llamacpp']}, "
                  f"differing {row['keys_differing']}", flush=True)
            ours.unlink()
            ref.unlink()
    import llama_cpp

    result = {"date": datetime.date.today().isoformat(), "llama_cpp_python": llama_cpp.__version__,
              "command": "python " + " ".join(sys.argv), "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.json)


if __name__ == "__main__":
    main()
