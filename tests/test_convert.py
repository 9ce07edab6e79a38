"""The converter on tiny random checkpoints of every supported architecture, against transformers
and llama.cpp, plus every bad input issue 3 lists.

Checkpoints: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM with random
weights (random biases and norms too), saved by `save_pretrained` as safetensors, each with
(a) a SentencePiece BPE model trained here on real prose and (b) a byte-level BPE tokenizer.json
trained here with `tokenizers`. Both vocabularies have 512 tokens, the models' vocab_size.

Tolerances (measured on these models, with margin):
- qkvgguf runtime on the f32 file vs transformers: max|d| / max|ref| <= 1e-4 (issue 3);
  (seen: 1e-7 .. 3e-7);
- llama.cpp on the f32 file vs transformers: <= 1e-3 (seen: 9e-5 .. 3.2e-4, from llama.cpp's own
  CPU kernels: f16 intermediate results in places, its own rope and softmax);
- q8_0 files, qkvgguf and llama.cpp vs transformers: <= 5e-2 (quantization error; seen 5e-3 .. 1.6e-2);
- other outtypes on qwen2 (seen, ours / llama.cpp): f16 3e-4 / 5e-4, bf16 2.7e-3 / 3.9e-3,
  q4_0 0.12 / 0.12, q4_1 0.14 / 0.14 (tiny random weights quantize badly at 4 bits).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import llamacpp
import texts
from qkvgguf import GGUFFile, QkvggufError
from qkvgguf.convert import convert
from qkvgguf.convert.arch import ARCHITECTURES
from qkvgguf.convert.bpe_pre import CHECK_TEXT
from qkvgguf.convert.vocab import VocabError
from qkvgguf.runtime import Model

VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# arch, tied, intermediate_size (80: ffn_down rows of 80 do not fit 32-blocks -> F16 fallback at q8_0)
ARCHS = {
    "llama": ("LlamaForCausalLM", False, 96),
    "mistral": ("MistralForCausalLM", True, 80),
    "qwen2": ("Qwen2ForCausalLM", False, 96),
    "qwen3": ("Qwen3ForCausalLM", True, 96),
}
CASES = [(a, t) for a in ARCHS for t in ("spm", "bpe")]
BPE_PRE = "gpt-2"  # our tiny tokenizer uses GPT-2's byte-level regex; its hash is unknown to llama.cpp


def _prose_lines() -> list[str]:
    return [line for line in texts.sherlock()[:60000].splitlines() if line.strip()]


def hf_model(arch: str, seed: int = 0):
    import transformers as tf

    cls_name, tied, n_ff = ARCHS[arch]
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=n_ff, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    cfg = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "qwen3": tf.Qwen3Config}[arch](**common, **({"head_dim": 24} if arch == "qwen3" else {}))
    model = getattr(tf, cls_name)(cfg).float().eval()
    with torch.no_grad():  # random biases and norms, so those paths are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def write_spm(folder: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_prose_lines()), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "add_eos_token": False, "chat_template": TEMPLATE}))


def write_bpe(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_prose_lines(), trainer)
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kind, write in (("spm", write_spm), ("bpe", write_bpe)):
        out[kind] = tmp_path_factory.mktemp(f"tok-{kind}")
        write(out[kind])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizers_dir):
    """arch -> (transformers model, {tokenizer kind: HF folder})."""
    out = {}
    for i, arch in enumerate(ARCHS):
        model = hf_model(arch, seed=i)
        folders = {}
        for kind, tok_dir in tokenizers_dir.items():
            folder = tmp_path_factory.mktemp(f"{arch}-{kind}")
            model.save_pretrained(folder)
            for f in tok_dir.iterdir():
                shutil.copy(f, folder / f.name)
            folders[kind] = folder
        out[arch] = (model, folders)
    return out


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """(arch, tokenizer, outtype) -> GGUF path."""
    out_dir = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, (_, folders) in models.items():
        for kind, folder in folders.items():
            for outtype in ("f32", "q8_0"):
                path = out_dir / f"{arch}-{kind}-{outtype}.gguf"
                convert(folder, path, outtype, vocab_pre=BPE_PRE if kind == "bpe" else None)
                out[arch, kind, outtype] = path
    return out


def _ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float32)), torch.as_tensor(np.asarray(b, dtype=np.float32))
    return float((a - b).abs().max() / b.abs().max())


# -- conversion output ---------------------------------------------------------------------------


def test_registry_covers_issue_architectures():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch,kind", CASES)
def test_metadata_types_and_keys(converted, arch, kind):
    from gguf import GGUFReader, GGUFValueType, LlamaFileType

    r = GGUFReader(converted[arch, kind, "q8_0"])
    f = r.fields
    gguf_arch = {"mistral": "llama"}.get(arch, arch)

    def val(key):
        return f[key].contents()

    assert val("general.architecture") == gguf_arch
    assert f["general.file_type"].types == [GGUFValueType.UINT32]
    assert val("general.file_type") == LlamaFileType.MOSTLY_Q8_0
    assert f["general.quantization_version"].types == [GGUFValueType.UINT32]
    assert val("general.quantization_version") == 2
    for key, expected in [("block_count", 2), ("context_length", 256), ("embedding_length", 64),
                          ("feed_forward_length", ARCHS[arch][2]), ("attention.head_count", 4),
                          ("attention.head_count_kv", 2), ("vocab_size", VOCAB)]:
        assert f[f"{gguf_arch}.{key}"].types == [GGUFValueType.UINT32], key
        assert val(f"{gguf_arch}.{key}") == expected, key
    assert val(f"{gguf_arch}.rope.freq_base") == 10000.0
    assert val(f"{gguf_arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    if arch == "qwen3":
        assert val("qwen3.attention.key_length") == val("qwen3.attention.value_length") == 24
    assert val("tokenizer.ggml.model") == ("llama" if kind == "spm" else "gpt2")
    assert val("tokenizer.ggml.pre") == ("default" if kind == "spm" else BPE_PRE)
    assert len(val("tokenizer.ggml.tokens")) == VOCAB
    assert val("tokenizer.chat_template") == TEMPLATE
    if kind == "spm":
        assert (val("tokenizer.ggml.bos_token_id"), val("tokenizer.ggml.eos_token_id")) == (1, 2)
        assert val("tokenizer.ggml.add_bos_token") is True and val("tokenizer.ggml.add_space_prefix") is True
        types = val("tokenizer.ggml.token_type")
        assert types[0] == 2 and types[1] == types[2] == 3 and types[3] == 6  # unk, control, byte <0x00>
    else:
        assert val("tokenizer.ggml.bos_token_id") == SPECIALS.index("<|endoftext|>")
        assert val("tokenizer.ggml.eos_token_id") == SPECIALS.index("<|im_end|>")
        assert val("tokenizer.ggml.add_bos_token") is False
        assert len(val("tokenizer.ggml.merges")) > 0
        assert val("tokenizer.ggml.token_type")[:3] == [3, 3, 3]  # the added special tokens: control
    # our keys
    assert val("qkvgguf.outtype") == "q8_0"
    assert val("qkvgguf.source").startswith(ARCHS[arch][0])
    plan = dict(s.split("=") for s in val("qkvgguf.tensor_types"))
    assert plan == {t.name: t.tensor_type.name for t in r.tensors}
    assert ("output.weight" in plan) == (not ARCHS[arch][1])  # tied embeddings: no output tensor


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tensor_types_policy(converted, arch):
    types = {t.name: t.type.name for t in GGUFFile(converted[arch, "spm", "q8_0"]).tensors.values()}
    for name, t in types.items():
        if name.endswith("_norm.weight") or name.endswith(".bias"):
            assert t == "F32", name
        elif name.endswith("ffn_down.weight") and ARCHS[arch][2] % 32:
            assert t == "F16", name  # row length 80: falls back as llama.cpp does
        else:
            assert t == "Q8_0", name
    assert all(t.type.name == "F32" for t in GGUFFile(converted[arch, "spm", "f32"]).tensors.values())


def test_fallback_is_logged(models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qkvgguf.convert"):
        convert(models["mistral"][1]["spm"], tmp_path / "m.gguf", "q8_0")
    lines = [r.getMessage() for r in caplog.records if "ffn_down" in r.getMessage()]
    assert len(lines) == 2 and "row length 80 is not a multiple of 32 for Q8_0, using F16" in lines[0]


def test_q8_0_bytes_equal_gguf_quants(models, converted):
    """Q8_0 bytes are what llama.cpp's own quantizer makes of the (permuted) weights."""
    import gguf.quants

    from qkvgguf.convert.arch.llama import permute_rope_rows

    model = models["llama"][0]
    g = GGUFFile(converted["llama", "spm", "q8_0"])
    for hf_name, name, heads in [("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 2),
                                 ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight", None)]:
        w = model.state_dict()[hf_name].float()
        w = permute_rope_rows(w, heads) if heads else w
        expected = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(g.raw(name)), expected), name


# -- against transformers and llama.cpp ----------------------------------------------------------


@pytest.mark.parametrize("arch,kind", CASES)
def test_runtime_matches_transformers(models, converted, arch, kind):
    ids = _ids()
    ref = _reference(models[arch][0], ids)
    for outtype, tol in (("f32", 1e-4), ("q8_0", 5e-2)):
        model = Model(GGUFFile(converted[arch, kind, outtype]))
        ours = model.forward(ids, model.new_cache(32), logits="all")
        assert _rel(ours, ref) <= tol, (outtype, _rel(ours, ref))


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
@pytest.mark.parametrize("arch,kind", CASES)
def test_llamacpp_matches_transformers(models, converted, arch, kind):
    ids = _ids()
    ref = _reference(models[arch][0], ids)
    for outtype, tol in (("f32", 1e-3), ("q8_0", 5e-2)):
        llm = llamacpp.load(converted[arch, kind, outtype], n_ctx=64, logits_all=True)
        llm.reset()
        llm.eval(ids.tolist())
        got = np.array(llm.scores[:len(ids)])
        assert _rel(got, ref) <= tol, (outtype, _rel(got, ref))


@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_llamacpp_tokenizes_like_hugging_face(converted, tokenizers_dir, kind):
    text = texts.sherlock()[200000:204000]  # prose the tokenizers were not trained on
    llm = llamacpp.load(converted["qwen2", kind, "q8_0"], n_ctx=64, vocab_only=True)
    if kind == "spm":
        import sentencepiece as spm

        encode = spm.SentencePieceProcessor(model_file=str(tokenizers_dir["spm"] / "tokenizer.model")).encode
    else:
        from tokenizers import Tokenizer

        bpe = Tokenizer.from_file(str(tokenizers_dir["bpe"] / "tokenizer.json"))
        encode = lambda s: bpe.encode(s).ids  # noqa: E731
    for piece in (text, "  Holmes,\n\n  said he.\t3 33 333 ??", "I've 'RE you sure? ..."):
        assert llamacpp.tokenize(llm, piece) == encode(piece), repr(piece[:40])


# -- inputs: layouts and the pre-tokenizer ---------------------------------------------------------


def test_sharded_and_bin_checkpoints_give_the_same_file(models, converted, tmp_path):
    model, folders = models["qwen2"]
    src = folders["spm"]
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    for folder in (sharded, binary):
        shutil.copytree(src, folder)
        (folder / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        convert(folder, tmp_path / f"{folder.name}.gguf", "q8_0")
        a, b = GGUFFile(tmp_path / f"{folder.name}.gguf"), GGUFFile(converted["qwen2", "spm", "q8_0"])
        named = ("general.name", "qkvgguf.source")  # these name the folder
        assert {k: v for k, v in a.metadata.items() if k not in named} == \
            {k: v for k, v in b.metadata.items() if k not in named}
        assert all(np.array_equal(np.asarray(a.raw(n)), np.asarray(b.raw(n))) for n in b.tensors)


def test_unknown_bpe_pre_tokenizer_is_refused_with_the_override_named(models, tmp_path):
    with pytest.raises(VocabError, match=r"tokenizer\.json: BPE pre-tokenizer not recognized .*--vocab-pre NAME"):
        convert(models["llama"][1]["bpe"], tmp_path / "x.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_known_bpe_pre_tokenizer_is_identified(monkeypatch, models, tmp_path):
    """The hash path: our tokenizer's hash, entered in the table, names its pre-tokenizer."""
    from tokenizers import Tokenizer

    from qkvgguf.convert import bpe_pre

    folder = models["llama"][1]["bpe"]
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(CHECK_TEXT).ids
    monkeypatch.setitem(bpe_pre.HASHES, bpe_pre.check_hash(ids), "smollm")
    convert(folder, tmp_path / "x.gguf", "f32")
    assert GGUFFile(tmp_path / "x.gguf").metadata["tokenizer.ggml.pre"] == "smollm"


def test_pre_table_has_the_common_entries():
    from qkvgguf.convert.bpe_pre import HASHES

    names = set(HASHES.values())
    assert {"llama-bpe", "smollm", "qwen2", "gpt-2", "starcoder", "deepseek-llm", "deepseek-coder"} <= names
    assert HASHES["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"] == "smollm"


# -- bad input: one-line error, no output, no temporary file ---------------------------------------


def _spoil(kind: str, folder: Path) -> None:
    st = folder / "model.safetensors"
    if kind == "missing config.json":
        (folder / "config.json").unlink()
    elif kind == "unknown architecture":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"] = ["GPTBigCodeForCausalLM"]
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "corrupt safetensors header":
        data = bytearray(st.read_bytes())
        data[8:16] = b"\x00garbage"
        st.write_bytes(bytes(data))
    elif kind == "huge safetensors header length":
        data = bytearray(st.read_bytes())
        data[0:8] = (2**62).to_bytes(8, "little")
        st.write_bytes(bytes(data))
    elif kind == "truncated safetensors body":
        data = st.read_bytes()
        st.write_bytes(data[:len(data) - 1000])
    elif kind == "missing shard":
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                                "model.norm.weight": "model-00002-of-00002.safetensors"}}
        st.rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "no weights":
        st.unlink()
    elif kind == "no tokenizer":
        (folder / "tokenizer.model").unlink()
    elif kind == "vocab larger than the model":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["vocab_size"] = 300
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        raise ValueError(kind)


BAD = {
    "missing config.json": r"config\.json: missing",
    "unknown architecture": r"config\.json: architecture 'GPTBigCodeForCausalLM' is not supported \(supported: "
                            r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM\)",
    "corrupt safetensors header": r"model\.safetensors: corrupt safetensors header",
    "huge safetensors header length": r"model\.safetensors: corrupt safetensors header: length",
    "truncated safetensors body": r"model\.safetensors: truncated: tensor '.*' ends at byte",
    "missing shard": r"model-00002-of-00002\.safetensors: shard named in model\.safetensors\.index\.json is missing",
    "no weights": r"no weights found",
    "no tokenizer": r"no tokenizer found \(expected tokenizer\.model or tokenizer\.json\)",
    "vocab larger than the model": r"tokenizer\.model: tokenizer has 512 tokens but config\.json vocab_size is 300",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_one_line_error_and_no_output(models, tmp_path, kind):
    folder = tmp_path / "hf"
    shutil.copytree(models["llama"][1]["spm"], folder)
    _spoil(kind, folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(QkvggufError, match=BAD[kind]) as e:
        convert(folder, out_dir / "model.gguf", "q8_0")
    assert "\n" not in str(e.value)
    assert list(out_dir.iterdir()) == []


def test_existing_output_is_kept_unless_force(models, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(QkvggufError, match=r"model\.gguf: already exists \(use --force to overwrite\)"):
        convert(models["qwen3"][1]["spm"], out, "f32")
    assert out.read_bytes() == b"precious" and list(tmp_path.iterdir()) == [out]
    convert(models["qwen3"][1]["spm"], out, "f32", force=True)
    assert GGUFFile(out).metadata["general.architecture"] == "qwen3"
    assert list(tmp_path.iterdir()) == [out]


def test_interrupt_leaves_no_file(models, tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(models["qwen3"][1]["spm"], tmp_path / "model.gguf", "q8_0", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_unknown_outtype(models, tmp_path):
    with pytest.raises(QkvggufError, match=r"outtype 'q3_k' is not supported \(supported: f32, f16, bf16, q8_0"):
        convert(models["qwen3"][1]["spm"], tmp_path / "m.gguf", "q3_k")


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q4_0", "q4_1"])
def test_other_outtypes_load_in_llamacpp_and_run_close(models, tmp_path, outtype):
    model, folders = models["qwen2"]
    path = tmp_path / f"m-{outtype}.gguf"
    convert(folders["spm"], path, outtype)
    ids = _ids()
    ref = _reference(model, ids)
    ours = Model(GGUFFile(path))
    tol = {"f16": 5e-3, "bf16": 3e-2, "q4_0": 0.25, "q4_1": 0.25}[outtype]
    assert _rel(ours.forward(ids, ours.new_cache(32), logits="all"), ref) <= tol
    if llamacpp.available():
        llm = llamacpp.load(path, n_ctx=64, logits_all=True)
        llm.reset()
        llm.eval(ids.tolist())
        assert _rel(np.array(llm.scores[:len(ids)]), ref) <= tol


# -- the convert subcommand's layer -----------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    import argparse

    from qkvgguf.convert import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.run(p.parse_args(argv))


def test_cli_run_logs_one_line_per_tensor(models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert _cli([str(models["mistral"][1]["bpe"]), "-o", str(out), "--outtype", "q8_0", "--vocab-pre", "gpt-2",
                 "-v"]) == 0
    err = capsys.readouterr().err
    n_tensors = len(GGUFFile(out).tensors)
    tensor_lines = [line for line in err.splitlines() if line.startswith("qkvgguf: blk.") or "token_embd" in line]
    assert len(tensor_lines) >= n_tensors
    assert "qkvgguf: blk.0.ffn_down.weight: row length 80 is not a multiple of 32 for Q8_0, using F16" in err
    assert f"qkvgguf: wrote {out} (q8_0, {n_tensors} tensors" in err and "2 tensors fell back" in err


def test_cli_run_raises_user_errors(models, tmp_path):
    with pytest.raises(VocabError, match="--vocab-pre NAME"):
        _cli([str(models["llama"][1]["bpe"]), "-o", str(tmp_path / "m.gguf")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_bpe_vocab_matches_llamacpps_converter(smollm2_path, tmp_path):
    """SmolLM2's tokenizer (rebuilt by transformers from the llama.cpp-made GGUF, saved as
    tokenizer.json): our vocab equals what llama.cpp's converter wrote, and the check-string hash
    names the pre-tokenizer 'smollm' without an override."""
    from transformers import AutoTokenizer

    from qkvgguf.convert.vocab import load_vocab

    AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path)) \
        .save_pretrained(tmp_path)
    md = GGUFFile(smollm2_path).metadata
    v = load_vocab(tmp_path, len(md["tokenizer.ggml.tokens"]))
    assert (v.model, v.pre) == ("gpt2", "smollm")
    assert v.tokens == md["tokenizer.ggml.tokens"]
    assert v.token_types == md["tokenizer.ggml.token_type"]
    assert v.merges == md["tokenizer.ggml.merges"]
    assert v.chat_template == md["tokenizer.chat_template"]
    assert v.special == {"bos": md["tokenizer.ggml.bos_token_id"], "eos": md["tokenizer.ggml.eos_token_id"],
                         "unk": md["tokenizer.ggml.unknown_token_id"], "pad": md["tokenizer.ggml.padding_token_id"]}


def test_linear_rope_scaling_and_bf16_source(models, tokenizers_dir, tmp_path):
    """A bf16 checkpoint converts to bf16 bit for bit; linear rope scaling is written and honoured."""
    import transformers as tf

    model = models["llama"][0]
    cfg = tf.LlamaConfig(**{**model.config.to_dict(), "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 10000.0}})
    scaled = tf.LlamaForCausalLM(cfg).eval()
    scaled.load_state_dict(model.state_dict())
    scaled.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    for f in tokenizers_dir["spm"].iterdir():
        shutil.copy(f, tmp_path / "hf" / f.name)
    convert(tmp_path / "hf", tmp_path / "bf16.gguf", "bf16")
    convert(tmp_path / "hf", tmp_path / "f32.gguf", "f32")
    g = GGUFFile(tmp_path / "bf16.gguf")
    assert (g.metadata["llama.rope.scaling.type"], g.metadata["llama.rope.scaling.factor"]) == ("linear", 2.0)
    up = scaled.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert np.array_equal(np.asarray(g.raw("blk.0.ffn_up.weight")).view(np.uint16), up.view(torch.int16).numpy()
                          .view(np.uint16))
    ids = _ids()
    ref = _reference(scaled.float(), ids)
    assert _rel(_reference(model, ids), ref) > 1e-3  # the scaling changes the function
    ours = Model(GGUFFile(tmp_path / "f32.gguf"))
    assert _rel(ours.forward(ids, ours.new_cache(32), logits="all"), ref) <= 1e-4
