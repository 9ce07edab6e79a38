"""qkvgguf.hf: transformers models over GGUF blocks (from_gguf), and back to GGUF (quantize, save_gguf).

References and tolerances (relative: max|d| / max|ref| over every position's logits):
- from_gguf of a float32 file written by tests/tiny_models.py (an independent writer, Q/K permuted
  for llama) against the transformers model it came from: equal (seen: 0.0 for llama, qwen2,
  qwen3, tied and untied; <= 1e-6 asserted);
- from_gguf of a quantized file against our runtime on the same file: <= 1e-5 (seen: <= 4e-7;
  the same kernels, another graph);
- quantize + save_gguf: the file's tensors equal, name for name and byte for byte, the converter's
  file (convert/, checked against llama.cpp's toolchain in test_convert.py) made from the same
  float checkpoint and outtype; our runtime on it equals the in-memory quantized model (<= 1e-5);
  llama.cpp loads it and its logits are within 1e-3 of ours at f16 and within 1.5e-2 for
  quantized outtypes (seen: 0.5% .. 1.1% on these tiny random models: llama.cpp's CPU matmuls
  round the activations to 8 bits for quantized weights, and the same gap is seen between
  llama.cpp and our runtime on any such file; on SmolLM2 (slow test) the bar is 1e-2);
- SmolLM2 (slow): from_gguf logits within 1e-3 of our runtime, greedy generate equal to
  `qkvgguf run --temp 0`, every projection's blocks the file's own memory (no copies but Q and K).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import llamacpp  # noqa: E402
import texts  # noqa: E402
import tiny_models  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from qkvgguf import GGUFFile, QkvggufError, UnsupportedError  # noqa: E402
from qkvgguf.convert import convert  # noqa: E402
from qkvgguf.hf import HFInteropError, from_gguf, quantize, save_gguf  # noqa: E402
from qkvgguf.runtime import Model  # noqa: E402
from qkvgguf.torch import GGUFEmbedding, GGUFLinear  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these matmuls are tiny, and on a loaded 2-core machine an OpenMP pool of 2
    spends 100x the work in its barriers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float32)), torch.as_tensor(np.asarray(b, dtype=np.float32))
    return float((a - b).abs().max() / b.abs().max())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def _runtime_logits(path, ids: torch.Tensor) -> torch.Tensor:
    model = Model(GGUFFile(path))
    return model.forward(ids, model.new_cache(64), logits="all")


IDS = torch.randint(3, tiny_models.VOCAB, (20,), generator=torch.Generator().manual_seed(0))


# -- from_gguf on tiny files -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_from_gguf_f32_equals_the_transformers_model(arch, tied, tmp_path):
    hf = tiny_models.hf_model(arch, tied=tied)
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf(hf, arch, path)  # llama: Q/K rows permuted, which from_gguf must undo
    model = from_gguf(path)
    assert _rel(_logits(model, IDS), _logits(hf, IDS)) <= 1e-6
    assert isinstance(model.get_input_embeddings(), GGUFEmbedding)
    assert isinstance(model.lm_head, GGUFLinear)
    if tied:  # the head reads the embedding's bytes
        assert model.lm_head.qweight.data_ptr() == model.get_input_embeddings().qweight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_from_gguf_quantized_equals_our_runtime(arch, tmp_path):
    hf = tiny_models.hf_model(arch, seed=1)
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf(hf, arch, path, qtypes=[T.Q8_0, T.Q4_0, T.Q4_1, T.IQ4_NL])
    model = from_gguf(path)
    types = {m.weight_type for m in model.modules() if isinstance(m, GGUFLinear)}
    assert {T.Q8_0, T.Q4_0, T.Q4_1, T.IQ4_NL} <= types
    assert _rel(_logits(model, IDS), _runtime_logits(path, IDS)) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_config_is_the_one_transformers_derives(arch, tmp_path):
    """_config reads transformers' own key table from our parser; AutoConfig(gguf_file=...) is the
    reference (Qwen3's head_dim, which transformers leaves at its default, is reconciled after)."""
    import transformers

    from qkvgguf.hf import _config

    hf = tiny_models.hf_model(arch)
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf(hf, arch, path)
    ours = _config(GGUFFile(path), transformers).to_dict()
    ref = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name).to_dict()
    ref["vocab_size"] = tiny_models.VOCAB  # the file has no tokenizer, from which transformers counts it
    differ = {k for k in set(ours) | set(ref) if ours.get(k) != ref.get(k)}
    assert differ <= {"architectures", "_name_or_path", "transformers_version"}, differ


def test_from_gguf_generates(tmp_path):
    hf = tiny_models.hf_model("llama")
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf(hf, "llama", path)
    model = from_gguf(path)
    want = hf.generate(IDS[None, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = model.generate(IDS[None, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


# -- quantize + save_gguf on tiny checkpoints --------------------------------------------------------
def _tokenizer_folder(root: Path) -> Path:
    import test_convert

    folder = root / "tok"
    folder.mkdir()
    test_convert.write_bpe(folder)
    return folder


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory) -> Path:
    return _tokenizer_folder(tmp_path_factory.mktemp("hf-tok"))


def _checkpoint(arch: str, seed: int, tok: Path, out: Path):
    """A tiny transformers model of test_convert.py's kind (vocab 512, tied for mistral and qwen3),
    saved with the tokenizer as the converter's input; the model."""
    import test_convert

    model = test_convert.hf_model(arch, seed=seed)
    model.save_pretrained(out)
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)
    return model


def _same_tensors(a, b) -> None:
    fa, fb = GGUFFile(a), GGUFFile(b)
    assert list(fa.tensors) == list(fb.tensors)
    for name, info in fa.tensors.items():
        other = fb.tensors[name]
        assert (info.type, info.shape) == (other.type, other.shape), name
        assert np.array_equal(fa.raw(name), fb.raw(name)), name


@pytest.mark.parametrize("arch,outtype", [("llama", "q8_0"), ("mistral", "q4_0"), ("qwen2", "q4_k_m"),
                                          ("qwen3", "q8_0"), ("qwen2", "f16")])
def test_quantize_save_equals_converter_and_loads_in_llamacpp(arch, outtype, tok_folder, tmp_path):
    import test_convert

    model = _checkpoint(arch, 3, tok_folder, tmp_path / "hf")
    ids = test_convert._ids()
    quantize(model, outtype)
    assert isinstance(model.get_input_embeddings(), GGUFEmbedding)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    ours = _logits(model, ids)
    saved = save_gguf(model, tmp_path / "saved.gguf", tok_folder, vocab_pre=test_convert.BPE_PRE)
    convert(tmp_path / "hf", tmp_path / "converted.gguf", outtype, vocab_pre=test_convert.BPE_PRE)
    _same_tensors(saved, tmp_path / "converted.gguf")
    assert _rel(_runtime_logits(saved, ids), ours) <= 1e-5
    loaded = from_gguf(saved)
    assert _rel(_logits(loaded, ids), ours) <= 1e-5
    again = save_gguf(loaded, tmp_path / "again.gguf", tok_folder, vocab_pre=test_convert.BPE_PRE)
    _same_tensors(again, saved)  # GGUF -> transformers -> GGUF: the same blocks (Q/K un-permuted and back)
    if llamacpp.available():
        llm = llamacpp.load(saved, n_ctx=64, logits_all=True)
        llm.reset()
        llm.eval(ids.tolist())
        got = np.array(llm.scores[:len(ids)])
        assert _rel(got, ours) <= (1e-3 if outtype == "f16" else 1.5e-2)


def test_save_gguf_takes_a_transformers_tokenizer(tok_folder, tmp_path):
    import test_convert
    from transformers import AutoTokenizer

    model = _checkpoint("llama", 4, tok_folder, tmp_path / "hf")
    quantize(model, "Q8_0")
    a = save_gguf(model, tmp_path / "a.gguf", AutoTokenizer.from_pretrained(tok_folder),
                  vocab_pre=test_convert.BPE_PRE)
    b = save_gguf(model, tmp_path / "b.gguf", tok_folder, vocab_pre=test_convert.BPE_PRE)
    fa, fb = GGUFFile(a), GGUFFile(b)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
        assert fa.get(key) == fb.get(key), key


def test_quantize_with_imatrix_changes_the_rounding(tok_folder, tmp_path):
    import test_convert

    plain = quantize(test_convert.hf_model("llama", seed=5), "q4_0")
    rng = np.random.default_rng(0)
    imatrix = {"blk.0.ffn_up.weight": rng.gamma(0.5, size=64).astype(np.float32)}
    weighted = quantize(test_convert.hf_model("llama", seed=5), "q4_0", imatrix=imatrix)
    a, b = plain.model.layers[0].mlp.up_proj, weighted.model.layers[0].mlp.up_proj
    assert not torch.equal(a.qweight, b.qweight)
    assert torch.equal(plain.model.layers[0].mlp.gate_proj.qweight, weighted.model.layers[0].mlp.gate_proj.qweight)


def test_auto_with_collected_imatrix_equals_the_converters_auto(tok_folder, tmp_path):
    """quantize(model, "auto", imatrix=collect_imatrix(...), target_bpw=...) chooses the types the
    converter's `--outtype auto --target-bpw` chooses with the same importance matrix, and the bytes
    are the same."""
    import test_convert

    from qkvgguf.convert.mixed import Target
    from qkvgguf.hf import collect_imatrix

    model = _checkpoint("qwen2", 6, tok_folder, tmp_path / "hf")
    ids = torch.randint(3, 512, (4 * 32,), generator=torch.Generator().manual_seed(2))
    imatrix = collect_imatrix(model, ids, n_ctx=32)
    assert imatrix.n_chunks == 4 and imatrix.counts["blk.1.ffn_down.weight"] == 4 * 32
    assert "output.weight" not in imatrix.sums
    quantize(model, "auto", imatrix=imatrix, target_bpw=6.0)
    types = {m.weight_type for m in model.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))}
    assert len(types) > 1  # a mixture
    saved = save_gguf(model, tmp_path / "auto.gguf", tok_folder, vocab_pre=test_convert.BPE_PRE)
    convert(tmp_path / "hf", tmp_path / "conv.gguf", "auto", target=Target(bpw=6.0), imatrix=imatrix,
            vocab_pre=test_convert.BPE_PRE)
    _same_tensors(saved, tmp_path / "conv.gguf")
    f = GGUFFile(saved)
    bits = 8 * sum(i.n_bytes for i in f.tensors.values()) / sum(int(np.prod(i.shape)) for i in f.tensors.values())
    assert bits <= 6.0


def test_bad_input_is_a_clear_error(tok_folder, tmp_path):
    import test_convert

    model = test_convert.hf_model("llama")
    with pytest.raises(QkvggufError, match="'auto' needs target_bpw"):
        quantize(model, "auto")
    with pytest.raises(QkvggufError, match="'q9' is not a ggml type"):
        quantize(model, "q9")
    quantize(model, "q8_0")
    with pytest.raises(HFInteropError, match="already a GGUF module"):
        quantize(model, "q8_0")
    (tmp_path / "x.gguf").write_bytes(b"keep")
    with pytest.raises(QkvggufError, match="already exists"):
        save_gguf(model, tmp_path / "x.gguf", tok_folder)
    assert (tmp_path / "x.gguf").read_bytes() == b"keep"
    with pytest.raises(QkvggufError, match="not a tokenizer folder"):
        save_gguf(model, tmp_path / "y.gguf", tmp_path / "nowhere")
    assert not list(tmp_path.glob("*y.gguf*"))  # nothing half-written
    with pytest.raises(QkvggufError):
        from_gguf(tmp_path / "x.gguf")  # not a GGUF file


def test_import_qkvgguf_imports_no_transformers():
    code = ("import sys, qkvgguf, qkvgguf.torch, qkvgguf.hf; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- SmolLM2 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2_path):
    return from_gguf(smollm2_path)


def _smol_ids(path, n: int = 48) -> list[int]:
    from qkvgguf.tokenizer import Tokenizer

    return Tokenizer.from_gguf(GGUFFile(path)).encode(texts.war_and_peace()[100_000:101_000])[:n]


@pytest.mark.slow
def test_smollm2_logits_match_our_runtime(smol, smollm2_path):
    ids = torch.tensor(_smol_ids(smollm2_path))
    got, want = _logits(smol, ids), _runtime_logits(smollm2_path, ids)
    assert float((got - want).abs().max()) <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_generate_equals_cli(smol, smollm2_path, capsys):
    from qkvgguf.cli import main
    from qkvgguf.tokenizer import Tokenizer

    prompt = "The old prince said that"
    assert main(["run", "-m", smollm2_path, "-p", prompt, "-n", "24", "--temp", "0", "-t", "1"]) == 0
    cli_text = capsys.readouterr().out
    tok = Tokenizer.from_gguf(GGUFFile(smollm2_path))
    ids = tok.encode(prompt, add_special=True, parse_special=True)
    out = smol.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert cli_text == prompt + tok.decode(out) + "\n"


@pytest.mark.slow
def test_smollm2_projections_are_the_files_blocks(smol, smollm2_path):
    """Every projection but Q and K views the file's memory map (no copy); Q and K are the file's
    rows, permuted whole."""
    gf = smol._qkvgguf_file  # the model's own map of the file
    assert os.path.samefile(gf.path, smollm2_path)
    mm = gf.raw("token_embd.weight")
    assert smol.get_input_embeddings().qweight.data_ptr() == mm.ctypes.data
    assert smol.lm_head.qweight.data_ptr() == mm.ctypes.data  # tied
    for i, layer in enumerate(smol.model.layers):
        for module, name in ((layer.self_attn.v_proj, "attn_v"), (layer.mlp.down_proj, "ffn_down")):
            assert module.qweight.data_ptr() == gf.raw(f"blk.{i}.{name}.weight").ctypes.data
        q = layer.self_attn.q_proj.qweight.numpy()
        file_rows = gf.raw(f"blk.{i}.attn_q.weight")
        assert sorted(map(bytes, q)) == sorted(map(bytes, file_rows))
    floats = [name for name, _ in smol.named_parameters()]
    assert floats and all(name.endswith("norm.weight") for name in floats), floats  # the norms only


@pytest.mark.slow
def test_readme_snippet_runs_as_written(tmp_path):
    """The README's from_gguf section, extracted and run in a fresh interpreter."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- tested: tests/test_hf_interop.py -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README has no tested snippet"
    script = tmp_path / "snippet.py"
    script.write_text(m[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "smollm2-q8_0.gguf").is_file()


def _float_copy(model):
    """A float32 transformers model with the same weights: GGUF modules dequantized back to
    nn.Linear / nn.Embedding (the input of quantize, as a model fresh from Hugging Face would be)."""
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(module, GGUFLinear):
            lin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight = torch.nn.Parameter(module.dequantize(), requires_grad=False)
            if module.bias is not None:
                lin.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            setattr(owner, leaf, lin)
        elif isinstance(module, GGUFEmbedding):
            setattr(owner, leaf, torch.nn.Embedding.from_pretrained(module.dequantize(), freeze=True))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    return model


def _perplexity(logits_of, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(torch.as_tensor(np.asarray(logits_of(w)), dtype=torch.float64)[:-1], dim=-1)
        total -= float(logp.gather(1, torch.tensor(w[1:])[:, None]).sum())
        count += len(w) - 1
    return float(np.exp(total / count))


@pytest.mark.slow
@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
def test_smollm2_quantize_save_runs_in_llamacpp_like_ours(smollm2_path, tmp_path):
    """SmolLM2 re-quantized to q4_k_m in memory and saved: llama.cpp's perplexity on the file within
    1% of the in-memory model's (the project's bar against llama.cpp, test_smollm2.py; per-logit
    differences on a 30-layer model are dominated by llama.cpp's 8-bit activations)."""
    from transformers import AutoTokenizer

    from qkvgguf.tokenizer import Tokenizer

    model = quantize(_float_copy(from_gguf(smollm2_path)), "q4_k_m")
    types = {m.weight_type for m in model.modules() if isinstance(m, GGUFLinear)}
    assert {T.Q4_K, T.Q6_K} <= types
    folder, name = os.path.split(smollm2_path)
    saved = save_gguf(model, tmp_path / "smol-q4_k_m.gguf", AutoTokenizer.from_pretrained(folder, gguf_file=name))
    tok = Tokenizer.from_gguf(GGUFFile(smollm2_path))
    ids = tok.encode(texts.war_and_peace()[:20_000], add_special=True)[:512]
    windows = [ids[:256], ids[256:512]]
    ours = _perplexity(lambda w: _logits(model, torch.tensor(w)), windows)
    llm = llamacpp.load(saved, n_ctx=256, n_batch=256, logits_all=True)

    def theirs(w):
        llm.reset()
        llm.eval(w)
        return np.array(llm.scores[:len(w)])

    ref = _perplexity(theirs, windows)
    assert abs(ours / ref - 1) <= 0.01, f"ours {ours:.4f}, llama.cpp {ref:.4f}"
    assert _rel(_runtime_logits(saved, torch.tensor(ids[:64])), _logits(model, torch.tensor(ids[:64]))) <= 1e-4
