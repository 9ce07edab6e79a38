"""benchmarks/gpu_suite.py --dry-run: every stage's setup and control flow on the CPU (tiny model,
Triton interpreter), so the suite that a rare GPU session runs cannot rot in between."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _suite_module():
    """benchmarks/gpu_suite.py loaded by path: benchmarks/ never goes on sys.path here (its module
    names would shadow installed packages for the rest of the test session)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(ROOT, "benchmarks", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_reaches_every_stage(tmp_path):
    gpu_suite = _suite_module()

    out = tmp_path / "suite"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["results"]] == [s for s, _, _ in gpu_suite.STAGES]
    assert all(s["status"] == "ok" for s in summary["results"]), summary["results"]
    for name, _, _ in gpu_suite.STAGES:
        data = json.loads((out / f"{name}.json").read_text())
        assert (out / f"{name}.md").read_text().strip(), name
        if name in ("models", "kernels", "sweep", "decode", "kv4k", "paging"):
            rows = data["rows"]
            ours = [x for x in rows if x.get("engine") != "llama.cpp"]
            assert ours and not [x for x in ours if "error" in x or "skipped" in x], (name, rows)
    tests = json.loads((out / "tests.json").read_text())
    assert tests["returncode"] == 0 and tests["counts"]["passed"] > 0 and not tests["failures"]
    decode = json.loads((out / "decode.json").read_text())["rows"]
    ours = [x for x in decode if x.get("engine") != "llama.cpp"]
    assert all(x["decode_tokens_per_s"] > 0 and x["cmd"].startswith("qkvgguf bench -m ") for x in ours)
    reference = [x for x in decode if x.get("engine") == "llama.cpp"]  # the same file in llama.cpp
    assert len(reference) == 1 and reference[0].get("decode_tokens_per_s", 0) > 0, reference
    text = (out / "summary.md").read_text()
    for name, _, _ in gpu_suite.STAGES:
        assert f"| {name} | ok |" in text


def test_unknown_stage_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--out", str(tmp_path),
                        "--stages", "env,nope"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "unknown stage" in r.stderr and "Traceback" not in r.stderr
