"""The qkvgguf command: exit statuses, one-line errors, and the main jobs end to end."""

import json
import subprocess
import sys

import pytest

import texts
from qkvgguf.cli import main

from cli_errors import one_line_error

from test_gguf_file import _write


def _cli(*args, stdin=None):
    """Run `python -m qkvgguf ARGS` in a subprocess: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "qkvgguf", *args], capture_output=True, text=True, input=stdin,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_run_default_model_greedy():
    rc, out, err = _cli("run", "Once upon a time", "-n", "24", "--temp", "0", "--stats")
    assert rc == 0, err
    assert "no -m given: using the demo model SmolLM2-135M-Instruct" in err
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time") + 40
    assert "decode: " in err


def test_run_truncated_file(tmp_path, smollm2_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(40_000_000))
    rc, _, err = _cli("run", "-m", str(bad), "hello")
    one_line_error(rc, err, str(bad), "past the end")


def test_empty_prompt(capsys):
    assert main(["run", "   "]) == 2
    one_line_error(2, capsys.readouterr().err, "empty prompt")


def test_context_larger_than_model(capsys, smollm2_path):
    assert main(["run", "-m", smollm2_path, "-c", "100000", "hi"]) == 2
    one_line_error(2, capsys.readouterr().err, smollm2_path, "8192")


def test_unsupported_architecture(capsys, tmp_path):
    path = _write(tmp_path / "a.gguf", arch="gpt2")
    assert main(["run", "-m", path, "hi"]) == 2
    one_line_error(2, capsys.readouterr().err, path, "'gpt2'")


def test_bad_size_flag(capsys):
    assert main(["run", "--cpu-cache", "lots", "hi"]) == 2
    one_line_error(2, capsys.readouterr().err, "lots")


def test_inspect_json(capsys, smollm2_path):
    assert main(["inspect", smollm2_path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    counts = {t["type"]: t["n_tensors"] for t in data["types"]}
    assert counts == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert sum(t["n_bytes"] for t in data["tensors"]) == data["totals"]["n_bytes"] == 96_576_768


def test_inspect_text_and_errors(capsys, tmp_path, smollm2_path):
    assert main(["inspect", smollm2_path, "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "blk.29.ffn_down.weight" in out and "Q4_1" in out and "total: 272 tensors" in out
    (tmp_path / "x.bin").write_bytes(b"\0" * 100)
    assert main(["inspect", str(tmp_path / "x.bin")]) == 2
    one_line_error(2, capsys.readouterr().err, "not a GGUF file")


def test_perplexity_command(capsys, tmp_path, smollm2_path):
    text = tmp_path / "t.txt"
    text.write_text(texts.sherlock()[30_000:36_000])
    assert main(["perplexity", "-m", smollm2_path, "-f", str(text), "-c", "128", "--chunks", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["windows"] == 2 and res["tokens_scored"] == 2 * 127
    assert 2 < res["ppl"] < 60  # a working model on English prose; a broken one is in the thousands


def test_convert_missing_folder(capsys, tmp_path):
    assert main(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o.gguf")]) == 2
    one_line_error(2, capsys.readouterr().err, "nope")
    assert not (tmp_path / "o.gguf").exists()


def test_bench(capsys):
    import json

    assert main(["bench", "-p", "12", "-n", "3", "-ctk", "q8_0", "-ctv", "q4_0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_prompt"] == 12 and r["n_gen"] == 3 and r["prompt_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert (r["type_k"], r["type_v"]) == ("q8_0", "q4_0")
    assert main(["bench", "-p", "0"]) == 2
    one_line_error(2, capsys.readouterr().err, "-p must be at least 1")


def test_vram_budget_too_small_fails_before_allocating(monkeypatch, smollm2_path):
    """The CUDA path of --vram, with torch.cuda's memory queries faked: a budget below the planner's
    minimum is a one-line error naming the file and the minimum, raised before any model exists."""
    import torch

    from qkvgguf import GGUFFile
    from qkvgguf.config import ModelConfig
    from qkvgguf.run_config import RunConfig
    from qkvgguf.runtime.planner import BudgetTooSmall, minimum_budget, specs_of
    from qkvgguf.units import format_bytes

    fraction = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (3 * 2**30, 4 * 2**30))
    def set_fraction(f, dev=None):  # as torch: the device must carry an index
        assert isinstance(dev, int) or (dev is not None and torch.device(dev).index is not None), dev
        fraction.append(f)

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gguf = GGUFFile(smollm2_path)
    cfg = ModelConfig.from_gguf(gguf)
    rc = RunConfig(type_k="q8_0", type_v="q8_0", vram="600MiB", n_batch=512)
    with pytest.raises(BudgetTooSmall) as e:
        rc.plan_vram(gguf, cfg, "cuda", 8192, smollm2_path)
    low = minimum_budget(specs_of(gguf), cfg, 8192, "q8_0", "q8_0", 512)
    assert f"needs at least {format_bytes(low)}" in str(e.value) and smollm2_path in str(e.value)
    assert not fraction  # nothing capped, nothing allocated
    rc = RunConfig(type_k="q8_0", type_v="q8_0", vram=None, n_batch=512)  # default: free memory minus a margin;
    p = rc.plan_vram(gguf, cfg, "cuda", 8192, smollm2_path)  # the allocator is capped to the budget
    assert p.all_resident and p.budget == 3 * 2**30 - 256 * 2**20
    assert fraction == [pytest.approx((p.budget - p.context_bytes) / (4 * 2**30))]


def test_n_gpu_layers_flag_reaches_the_plan(smollm2_path, monkeypatch, capsys):
    """-ngl goes through RunConfig to the planner (fake CUDA memory queries); negative: one-line error."""
    import torch

    from qkvgguf import GGUFFile
    from qkvgguf.cli import build_parser
    from qkvgguf.config import ModelConfig
    from qkvgguf.run_config import RunConfig

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (3 * 2**30, 4 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, dev=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gguf = GGUFFile(smollm2_path)
    cfg = ModelConfig.from_gguf(gguf)
    args = build_parser().parse_args(["bench", "-m", smollm2_path, "-ngl", "7"])
    rc = RunConfig.from_args(args)
    assert rc.n_gpu_layers == 7
    p = rc.plan_vram(gguf, cfg, "cuda", 512, smollm2_path)
    assert [u for u in p.resident_units if u >= 0] == list(range(7)) and len(p.streamed_units) == cfg.n_layer - 7 + 1
    assert main(["run", "-m", smollm2_path, "-ngl", "-1", "hi"]) == 2
    one_line_error(2, capsys.readouterr().err, "-ngl/--n-gpu-layers must be 0 or more")


def test_backend_flags(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["run", "--backend", "triton", "--device", "cpu", "hi"]) == 2
    one_line_error(2, capsys.readouterr().err, "backend triton is not available")
    assert main(["run", "--device", "tpu", "hi"]) == 2
    one_line_error(2, capsys.readouterr().err, "--device")
