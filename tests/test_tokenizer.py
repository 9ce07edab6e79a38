"""Tokenizer tests: token ids and text against llama.cpp (the reference), on the real SmolLM2 vocabulary and
on tiny vocabularies trained here (SentencePiece 'llama', byte-level BPE 'gpt2' under every pre-tokenizer).

llama.cpp is reached through tests/llamacpp.py with vocab_only=True; `llama_detokenize`, `llama_vocab_is_eog`
and `llama_vocab_get_attr` are called through llama-cpp-python's ctypes bindings.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
from pathlib import Path

import pytest

import texts

import llamacpp
from qkvgguf.errors import GGUFError, QkvggufError, UnsupportedError
from qkvgguf.gguf_file import GGUFFile
from qkvgguf.tokenizer import StreamDecoder, TokenAttr, Tokenizer, render_chat
from qkvgguf.tokenizer.bpe import PRE_TOKENIZERS

pytestmark = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")


def real_prose() -> str:
    """Genuine public-domain English prose: The Adventures of Sherlock Holmes (Project Gutenberg),
    as shipped in `cherche==1.0.1` (see tests/texts.py); ~560 KB."""
    return texts.sherlock()


# Everything a pre-tokenizer regex can trip on: digits, contractions in both cases, runs of spaces,
# tabs, newlines and CR, non-ASCII whitespace, accents (precomposed and combining), CJK, Hangul, emoji,
# symbols, special-token texts, a codepoint Unicode 15.1 added (U+31350) and an unassigned one (U+0378).
MIXED = (
    "Hello  world!\n\n\tTabs\t\there. don't I'LL we'VE it's She'd 12345678 3.14 1,000,000 $100 +=<>^~| "
    "caf\u00e9 nai\u0308ve \u00d1and\u00fa \u65e5\u672c\u8a9e\u306e\u6587\u7ae0 \ud55c\uad6d\uc5b4 "
    "\u4f60\u597d\u3002 \U0001f600\U0001f389\U0001f44d\U0001f3fd <|im_start|>user\nhi<|im_end|>\n"
    "<|endoftext|> <tool>x</tool> \u00a0nbsp\u3000ideo\u2028ls \r\n crlf \x0b\x0c\x1c\x85 "
    "zzqx  zzqx ABCdef DEFghi \u0391\u0392\u0393\u03b1\u03b2\u03b3 \u0663\u0664\u0665 \u00bd \u216b "
    "`code` [x]{y}(z) ... !!! ??? , . ' s 're ' ve <sentinel:12> IMGIMGABZ \U00031350\u0378 "
    "\u2581x  \ufeffbom end   "
)


# ---- llama.cpp helpers ---------------------------------------------------------------------------

def ref_detokenize(llm, ids: list[int], remove_special: bool, unparse_special: bool) -> str:
    import llama_cpp

    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 16 * len(ids) + 64
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = -n
    raise AssertionError("llama_detokenize kept asking for more room")


def ref_vocab_facts(llm, n: int):
    import llama_cpp

    vocab = llm._model.vocab
    null = lambda t: None if t < 0 else t  # noqa: E731
    return {
        "bos": null(llama_cpp.llama_vocab_bos(vocab)),
        "eos": null(llama_cpp.llama_vocab_eos(vocab)),
        "eot": null(llama_cpp.llama_vocab_eot(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog": {t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)},
        "attrs": [int(llama_cpp.llama_vocab_get_attr(vocab, t)) for t in range(n)],
    }


def assert_same_vocab_facts(tok: Tokenizer, llm):
    ref = ref_vocab_facts(llm, tok.vocab_size)
    assert (tok.bos_id, tok.eos_id) == (ref["bos"], ref["eos"])
    # without tokenizer.ggml.eot_token_id, llama.cpp takes the first EOT-looking text in hash-map order, we the
    # lowest id: they may differ, but both end generation
    assert (tok.eot_id is None) == (ref["eot"] is None)
    assert {tok.eot_id, ref["eot"]} - {None} <= tok.eog_ids
    assert (tok.add_bos, tok.add_eos) == (ref["add_bos"], ref["add_eos"])
    assert tok.eog_ids == ref["eog"]
    assert all(tok.is_eog(t) == (t in ref["eog"]) for t in range(tok.vocab_size))
    ours = [int(a) for a in tok.attrs]
    bad = [(t, tok.tokens[t], ours[t], ref["attrs"][t]) for t in range(tok.vocab_size) if ours[t] != ref["attrs"][t]]
    assert not bad, f"token attributes differ (id, text, ours, llama.cpp): {bad[:10]}"


def first_difference(ours: list[int], ref: list[int], tok: Tokenizer) -> str:
    i = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    show = lambda ids: [tok.tokens[t] for t in ids[max(0, i - 3):i + 5]]  # noqa: E731
    return f"first difference at {i}: ours {show(ours)} llama.cpp {show(ref)}"


def assert_encodes_like_llama(tok: Tokenizer, llm, text: str, add_special: bool, parse_special: bool):
    ours = tok.encode(text, add_special=add_special, parse_special=parse_special)
    ref = llamacpp.tokenize(llm, text, add_bos=add_special, special=parse_special)
    assert ours == ref, first_difference(ours, ref, tok)
    return ours


def assert_decodes_like_llama(tok: Tokenizer, llm, ids: list[int]):
    for skip in (False, True):
        assert tok.decode(ids, skip_special=skip) == ref_detokenize(llm, ids, skip, not skip)


# ---- (a) the real SmolLM2 vocabulary (gpt2 BPE, pre 'smollm') ----------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_path):
    tok = Tokenizer.from_gguf(GGUFFile(smollm2_path))
    return tok, llamacpp.load(smollm2_path, vocab_only=True)


def test_smollm2_prose_matches_llama_cpp(smol):
    tok, llm = smol
    text = real_prose()
    assert len(text.encode("utf-8")) >= 40_000
    ids = assert_encodes_like_llama(tok, llm, text, add_special=False, parse_special=False)
    assert tok.decode(ids) == text
    assert_decodes_like_llama(tok, llm, ids)


@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("add_special", [False, True])
def test_smollm2_mixed_text_matches_llama_cpp(smol, add_special, parse_special):
    tok, llm = smol
    ids = assert_encodes_like_llama(tok, llm, MIXED, add_special, parse_special)
    assert_decodes_like_llama(tok, llm, ids)
    if not parse_special:
        assert not any(tok.attrs[t] & TokenAttr.CONTROL for t in ids)  # none out of plain text
        assert tok.decode(ids) == MIXED
    else:
        assert tok.tokens.index("<|im_start|>") in ids


def test_smollm2_vocab_facts_match_llama_cpp(smol):
    tok, llm = smol
    assert tok.model_name == "gpt2" and tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert {tok.tokens[t] for t in tok.eog_ids} >= {"<|im_end|>", "<|endoftext|>"}
    assert_same_vocab_facts(tok, llm)


def test_smollm2_stream_decoder_holds_back_split_characters(smol):
    tok, _ = smol
    text = "Emoji \U0001f600\U0001f389 and \u65e5\u672c\u8a9e, then <|im_end|> done."
    ids = tok.encode(text, add_special=False, parse_special=True)
    pieces = [tok.token_to_bytes(t) for t in ids]
    assert any(_incomplete_utf8(p) for p in pieces), "no token splits a character: the test proves nothing"
    stream = tok.stream()
    chunks = [stream.feed(t) for t in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + stream.flush() == tok.decode(ids, skip_special=True) == text.replace("<|im_end|>", "")
    shown = StreamDecoder(tok, skip_special=False)
    assert "".join(shown.feed(t) for t in ids) + shown.flush() == text
    cut = next(i for i, p in enumerate(pieces) if _incomplete_utf8(p))  # stop inside a character
    partial = tok.stream()
    head = "".join(partial.feed(t) for t in ids[:cut + 1])
    assert "\ufffd" not in head and partial.flush() == "\ufffd"


def _incomplete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# ---- (b) a tiny SentencePiece vocabulary (tokenizer.ggml.model = 'llama') --------------------------

def write_gguf(path: Path, kv: dict) -> str:
    """A GGUF holding only metadata (llama.cpp loads it with vocab_only=True)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            w.add_array(key, value)  # float32 array
        elif isinstance(value, list) and value and isinstance(value[0], int):
            w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module", params=["scores", "tied-scores"])
def spm_vocab(request, tmp_path_factory):
    """The trained scores, or the same rounded so that many merges tie (then the leftmost pair goes first)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    prose = real_prose()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(prose[:12_000].splitlines()), model_writer=buf, vocab_size=500, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|user|>"],
        control_symbols=["<|ctrl|>"], minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    pieces = list(proto.pieces)
    kv = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in pieces],
        "tokenizer.ggml.scores": [float(p.score // 25 if request.param == "tied-scores" else p.score)
                                  for p in pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in pieces],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    path = write_gguf(tmp_path_factory.mktemp("spm") / f"{request.param}.gguf", kv)
    return Tokenizer.from_gguf(GGUFFile(path)), llamacpp.load(path, vocab_only=True), prose[12_000:18_000]


@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("add_special", [False, True])
def test_spm_matches_llama_cpp(spm_vocab, add_special, parse_special):
    tok, llm, prose = spm_vocab
    assert tok.model_name == "llama" and tok.add_space_prefix
    for text in (prose, MIXED, " leading space", "<|user|>x<|ctrl|> y", ""):
        ids = assert_encodes_like_llama(tok, llm, text, add_special, parse_special)
        assert_decodes_like_llama(tok, llm, ids)
    # '\u2581' decodes to ' ', and a space is put after each special token: both as in llama.cpp
    for text in (prose, MIXED.replace("\u2581", ""), " leading space"):
        assert tok.decode(tok.encode(text, add_special=False)) == text
    assert any(tok.attrs[t] & TokenAttr.BYTE for t in tok.encode(MIXED)), "no byte fallback: the test proves nothing"
    ids = tok.encode("<|user|>x<|ctrl|> y", add_special=False, parse_special=False)
    assert tok.tokens.index("<|user|>") in ids  # USER_DEFINED tokens are cut out even without parse_special
    assert tok.tokens.index("<|ctrl|>") not in ids


def test_spm_vocab_facts_match_llama_cpp(spm_vocab):
    tok, llm, _ = spm_vocab
    assert_same_vocab_facts(tok, llm)


# ---- (c) a tiny byte-level BPE vocabulary under every pre-tokenizer ---------------------------------

UNMERGED = "\u0120xylqz"  # ' xylqz' in GPT-2's byte alphabet


@pytest.fixture(scope="module")
def bpe_kv():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    prose = real_prose()
    hf = HFTokenizer(models.BPE())
    # no pre-tokenizer while training: merges then cross word boundaries, so any piece boundary that differs
    # from llama.cpp's changes the tokens (MIXED is repeated so that its odd corners get merges too)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    hf.train_from_iterator([prose[:20_000]] + [MIXED] * 30, trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") else 1 for t in tokens]
    # a word that is a token but that no merge builds (ignore_merges takes it whole) and a USER_DEFINED token
    assert UNMERGED not in tokens and "<tool>" not in tokens
    tokens += [UNMERGED, "<tool>"]
    types += [1, 4]
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.merges": merges}
    return kv, prose[20_000:24_000]


def _pre_names():
    """Every pre value we support, one per distinct behaviour plus the ones named by the brief."""
    seen, names = set(), []
    for name, pre in sorted(PRE_TOKENIZERS.items()):
        if pre not in seen or name in ("default", "gpt-2", "llama-bpe", "smollm", "qwen2", "starcoder"):
            seen.add(pre)
            names.append(name)
    return names


@pytest.mark.parametrize("pre", _pre_names())
def test_bpe_pre_tokenizers_match_llama_cpp(bpe_kv, tmp_path, pre):
    kv, prose = bpe_kv
    path = write_gguf(tmp_path / f"{pre}.gguf", {**kv, "tokenizer.ggml.pre": pre})
    tok, llm = Tokenizer.from_gguf(GGUFFile(path)), llamacpp.load(path, vocab_only=True)
    text = prose + "\n" + MIXED + " xylqz"
    for add_special, parse_special in ((False, False), (True, True)):
        ids = assert_encodes_like_llama(tok, llm, text, add_special, parse_special)
        assert_decodes_like_llama(tok, llm, ids)
    assert (tok.tokens.index(UNMERGED) in ids) == tok._model.pre_tokenizer.ignore_merges
    assert_same_vocab_facts(tok, llm)
    if not tok.clean_spaces:
        assert tok.decode(tok.encode(text, add_special=False)) == text


def test_bpe_decode_matches_llama_cpp_on_random_ids(bpe_kv, tmp_path):
    """Random id sequences, heavy in spaces, quotes and punctuation: clean_spaces, specials, split UTF-8."""
    import random

    kv, _ = bpe_kv
    path = write_gguf(tmp_path / "gpt2.gguf", {**kv, "tokenizer.ggml.pre": "gpt-2"})
    tok, llm = Tokenizer.from_gguf(GGUFFile(path)), llamacpp.load(path, vocab_only=True)
    assert tok.clean_spaces
    for text in ("a ' ' ' b", "' ' '", "it ' s you ' re we ' ve I ' m don ' t he ' d they ' ll", " , . ? ! a ,b",
                 " 's 'm 're 've 't 'd 'll ' x", "x ' ", " '"):
        assert_decodes_like_llama(tok, llm, tok.encode(text))
    tricky = [t for t in range(tok.vocab_size) if set(tok.decode([t])) <= set(" '?!.,smtdrevl")]
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(tricky) if rng.random() < 0.8 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 12))]
        assert_decodes_like_llama(tok, llm, ids)


def test_bpe_missing_pre_is_default(bpe_kv, tmp_path):
    kv, prose = bpe_kv
    path = write_gguf(tmp_path / "nopre.gguf", kv)
    tok, llm = Tokenizer.from_gguf(GGUFFile(path)), llamacpp.load(path, vocab_only=True)
    assert tok._model.pre == "default"
    assert_encodes_like_llama(tok, llm, MIXED, True, False)


# ---- (d) errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, words", [
    ({"tokenizer.ggml.model": "bert"}, UnsupportedError, ["tokenizer.ggml.model", "'bert'", "gpt2, llama"]),
    ({"tokenizer.ggml.pre": "nonesuch"}, UnsupportedError, ["tokenizer.ggml.pre", "'nonesuch'", "llama-bpe"]),
    ({"tokenizer.ggml.tokens": None}, GGUFError, ["'tokenizer.ggml.tokens'", "missing"]),
    ({"tokenizer.ggml.model": None}, GGUFError, ["'tokenizer.ggml.model'", "missing"]),
    ({"tokenizer.ggml.merges": None}, GGUFError, ["'tokenizer.ggml.merges'", "missing"]),
    ({"tokenizer.ggml.token_type": [1, 1]}, GGUFError, ["'tokenizer.ggml.token_type'", "expected"]),
])
def test_bad_vocab_metadata_is_a_clear_error(bpe_kv, tmp_path, change, error, words):
    kv = {**bpe_kv[0], "tokenizer.ggml.pre": "qwen2", **change}
    path = write_gguf(tmp_path / "bad.gguf", {k: v for k, v in kv.items() if v is not None})
    with pytest.raises(error) as info:
        Tokenizer.from_gguf(GGUFFile(path))
    message = str(info.value)
    assert "\n" not in message and path in message
    for word in words:
        assert word in message


def test_out_of_range_id_is_a_clear_error(smol):
    tok, _ = smol
    with pytest.raises(QkvggufError, match="49152 is outside the vocabulary"):
        tok.decode([1, 49152])


# ---- (e) chat templates -----------------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]


def test_smollm2_chat_template_renders_chatml(smol):
    tok, llm = smol
    rendered = tok.render_chat(CONVERSATION, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_chat(CONVERSATION, add_generation_prompt=False) == rendered[:-len("<|im_start|>assistant\n")]
    assert_encodes_like_llama(tok, llm, rendered, add_special=True, parse_special=True)


def test_chat_matches_transformers(smol):
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tok, _ = smol
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}\n  [U] {{ m.content | trim }}\n"
                "{% else %}{% generation %}[A] {{ m.content }}{% endgeneration %}{{ eos_token }}{% endif %}\n"
                "{% endfor %}{% if add_generation_prompt %}[A]{% endif %}{{ {'k': '\u00e9'} | tojson }}")
    for t in (tok.chat_template, template):
        for gen in (False, True):
            ours = render_chat(t, CONVERSATION, "<s>", "</s>", add_generation_prompt=gen)
            theirs = chat_utils.render_jinja_template([CONVERSATION], chat_template=t, add_generation_prompt=gen,
                                                      bos_token="<s>", eos_token="</s>")[0][0]
            assert ours == theirs


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m.content }", ["does not parse", "line 1"]),
    ("{{ raise_exception('only user and assistant roles') }}", ["only user and assistant roles"]),
    ("{{ messages.append(1) }}", ["chat template failed"]),
    ("{{ messages[0].__class__.__mro__ }}", ["chat template failed"]),
])
def test_bad_chat_template_is_a_clear_error(template, words):
    with pytest.raises(QkvggufError) as info:
        render_chat(template, CONVERSATION, "<s>", "</s>")
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# -- Gemma 3: a 262k SentencePiece vocabulary with byte fallback, no space prefix, 6,414 specials ----
@pytest.fixture(scope="module")
def gemma(gemma3_path):
    tok = Tokenizer.from_gguf(GGUFFile(gemma3_path))
    return tok, llamacpp.load(gemma3_path, vocab_only=True)


def test_gemma3_whole_book_matches_llama_cpp(gemma):
    """The whole of The Adventures of Sherlock Holmes (~560 KB, 131,889 tokens) as llama.cpp tokenizes it."""
    tok, llm = gemma
    text = real_prose()
    ids = assert_encodes_like_llama(tok, llm, text, add_special=False, parse_special=False)
    assert len(ids) > 100_000
    assert tok.decode(ids) == text
    assert_decodes_like_llama(tok, llm, ids[:20_000])


@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("add_special", [False, True])
def test_gemma3_mixed_text_matches_llama_cpp(gemma, add_special, parse_special):
    tok, llm = gemma
    ids = assert_encodes_like_llama(tok, llm, MIXED + " <start_of_turn>user\nhi<end_of_turn>", add_special,
                                    parse_special)
    assert_decodes_like_llama(tok, llm, ids)
    assert (tok.tokens.index("<start_of_turn>") in ids) == parse_special


def test_gemma3_vocab_facts_match_llama_cpp(gemma):
    tok, llm = gemma
    assert tok.model_name == "llama" and tok.vocab_size == 262144
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (2, 1, True, False)
    assert {tok.tokens[t] for t in tok.eog_ids} >= {"<eos>", "<end_of_turn>"}
    assert tok.chat_template is None  # the base model's file carries none
    assert_same_vocab_facts(tok, llm)
