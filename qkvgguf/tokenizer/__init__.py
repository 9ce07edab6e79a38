"""Tokenizers read from GGUF metadata, matching llama.cpp's `llama_tokenize` / `llama_detokenize` exactly.

    tok = Tokenizer.from_gguf(GGUFFile("model.gguf"))
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)
    stream = tok.stream(); print(stream.feed(next_id), end="")

`tokenizer.ggml.model` picks the algorithm: 'gpt2' is byte-level BPE (bpe.py), 'llama' is
SentencePiece-style merging by score (spm.py). What both share lives here, ported from llama.cpp's
llama-vocab.cpp:

- token attributes from `tokenizer.ggml.token_type`, then llama.cpp's fix-ups by token text (EOT/EOM/FIM
  tokens become CONTROL; the end-of-generation set is built from a list of texts plus eos/eot/eom);
- special-token partitioning (`tokenizer_st_partition`): CONTROL and UNKNOWN tokens are cut out of the
  text only when `parse_special` is true, USER_DEFINED tokens always; longest token text first;
- BOS/EOS insertion with llama.cpp's defaults when `add_bos_token` / `add_eos_token` are absent;
- detokenization (`token_to_piece`, `detokenize`): CONTROL/UNKNOWN pieces only when rendering specials,
  the leading space of `add_space_prefix` dropped, and the `clean_spaces` pass where llama.cpp applies it.

Where llama.cpp picks "the first" of several EOT/FIM candidate texts by hash-map order, we pick the
lowest id; this only matters for a vocabulary holding two such texts that are not CONTROL already.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from ..errors import GGUFError, QkvggufError, UnsupportedError
from .bpe import BPEModel, byte_decode, parse_merges, resolve_pre
from .chat import render_chat
from .spm import SPACE, SPMModel

log = logging.getLogger(__name__)

# Token texts are read with surrogateescape (qkvgguf/gguf_file.py): a token whose bytes are not
# UTF-8 keeps them, and encoding with the same handler gives them back, as llama.cpp's pieces do
# (its token text is raw bytes); decode() then turns invalid UTF-8 into U+FFFD.
RAW = "surrogateescape"

__all__ = ["Tokenizer", "StreamDecoder", "TokenAttr", "render_chat", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = ("gpt2", "llama")


class TokenAttr(enum.IntFlag):
    """llama_token_attr."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# tokenizer.ggml.token_type (gguf TokenType) -> attribute; anything else is UNDEFINED
_TYPE_ATTR = {1: TokenAttr.NORMAL, 2: TokenAttr.UNKNOWN, 3: TokenAttr.CONTROL, 4: TokenAttr.USER_DEFINED,
              5: TokenAttr.UNUSED, 6: TokenAttr.BYTE}

_CONTROL_OR_UNKNOWN = TokenAttr.CONTROL | TokenAttr.UNKNOWN
_SPECIAL = TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN  # cut out of text by _partition
_C_SPACE = " \t\n\v\f\r"  # C isspace()

# special-token keys, in llama.cpp's order (a deprecated key read later overrides the new one)
_ID_KEYS = [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"), ("eom", "eom_token_id"),
            ("unk", "unknown_token_id"), ("sep", "seperator_token_id"), ("pad", "padding_token_id"),
            ("mask", "mask_token_id"), ("fim_pre", "fim_pre_token_id"), ("fim_suf", "fim_suf_token_id"),
            ("fim_mid", "fim_mid_token_id"), ("fim_pad", "fim_pad_token_id"), ("fim_rep", "fim_rep_token_id"),
            ("fim_sep", "fim_sep_token_id"), ("fim_pre", "prefix_token_id"), ("fim_suf", "suffix_token_id"),
            ("fim_mid", "middle_token_id")]

_FULL_BAR, _LOW_LINE = "\uff5c", "\u2581"  # DeepSeek's fullwidth '|' and SentencePiece's space
# texts that make a token the EOT/EOM/FIM token when its key is absent (and mark it CONTROL)
_DETECT = {
    "eot": ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", f"<{_FULL_BAR}end{_LOW_LINE}of{_LOW_LINE}sentence{_FULL_BAR}>", "<end_of_utterance>"],
    "eom": ["<|eom_id|>"],
    "fim_pre": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", f"<{_FULL_BAR}fim{_LOW_LINE}begin{_FULL_BAR}>",
                "<PRE>", f"{_LOW_LINE}<PRE>", "<|code_prefix|>", "<|prefix|>"],
    "fim_suf": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", f"<{_FULL_BAR}fim{_LOW_LINE}hole{_FULL_BAR}>",
                "<SUF>", f"{_LOW_LINE}<SUF>", "<|code_suffix|>", "<|suffix|>"],
    "fim_mid": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", f"<{_FULL_BAR}fim{_LOW_LINE}end{_FULL_BAR}>",
                "<MID>", f"{_LOW_LINE}<MID>", "<|code_middle|>", "<|middle|>"],
    "fim_pad": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "fim_rep": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "fim_sep": ["<|file_sep|>"],
}
# texts that end generation (llama.cpp's special_eog_ids list)
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    f"<{_FULL_BAR}end{_LOW_LINE}of{_LOW_LINE}sentence{_FULL_BAR}>", "[e~[",
])


def _list(meta: dict, key: str, path: str, n: int | None, kind: tuple[type, ...], what: str) -> list | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise GGUFError(f"{path}: metadata key '{key}' must be an array of {what}")
    if n is not None and len(value) < n:
        raise GGUFError(f"{path}: metadata key '{key}' has {len(value):,} entries, expected {n:,} (one per token)")
    return value


def _special_ids(meta: dict, path: str, n: int, defaults: dict[str, int | None]) -> dict[str, int | None]:
    """bos/eos/eot/... ids: the type's defaults (disabled if outside the vocabulary), then the file's keys."""
    ids = {name: defaults.get(name) for name, _ in _ID_KEYS}
    ids = {name: tid if tid is not None and tid < n else None for name, tid in ids.items()}
    for name, key in _ID_KEYS:
        full = "tokenizer.ggml." + key
        if full in meta:
            value = meta[full]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
                log.warning("%s: metadata key '%s' = %r is outside the vocabulary of %d tokens; using %r",
                            path, full, value, n, ids[name])
            else:
                ids[name] = value
    return ids


def _flag(meta: dict, key: str, default: bool, path: str) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise GGUFError(f"{path}: metadata key '{key}' must be a bool, found {value!r}")
    return value


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's encode/decode. Build it with `Tokenizer.from_gguf`."""

    def __init__(self, *, path: str, model_name: str, tokens: list[str], attrs: list[TokenAttr],
                 model: BPEModel | SPMModel, ids: dict[str, int | None], add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, clean_spaces: bool, eog_ids: set[int], chat_template: str | None):
        self.path = path
        self.model_name = model_name  # 'gpt2' or 'llama'
        self.tokens = tokens
        self.attrs = attrs
        self._model = model
        self._ids = ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.clean_spaces = clean_spaces
        self.eog_ids = frozenset(eog_ids)
        self.chat_template = chat_template
        special = [i for i, a in enumerate(attrs) if a & _SPECIAL]
        special.sort(key=lambda i: -len(tokens[i].encode("utf-8", RAW)))  # longest first (stable: lower id first)
        self._special = special
        self._pieces: dict[tuple[int, bool], bytes] = {}

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        meta: dict[str, Any] = gguf.metadata
        path = str(gguf.path)
        if "tokenizer.ggml.model" not in meta:
            raise GGUFError(f"{path}: required metadata key 'tokenizer.ggml.model' is missing")
        model_name = meta["tokenizer.ggml.model"]
        if model_name not in SUPPORTED_MODELS:
            raise UnsupportedError(f"{path}: tokenizer.ggml.model {model_name!r} is not supported "
                                   f"(supported: {', '.join(SUPPORTED_MODELS)})")
        raw_tokens = _list(meta, "tokenizer.ggml.tokens", path, None, (str,), "strings")
        if raw_tokens is None:
            raise GGUFError(f"{path}: required metadata key 'tokenizer.ggml.tokens' is missing")
        n = len(raw_tokens)
        if n == 0:
            raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.tokens' is empty")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(raw_tokens)]
        token_to_id = {t: i for i, t in enumerate(tokens)}
        if len(token_to_id) != n:  # llama.cpp aborts on these (GGML_ASSERT)
            first = next(t for i, t in enumerate(tokens) if token_to_id[t] != i)
            raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.tokens' holds {first!r} twice "
                            f"(ids {tokens.index(first)} and {token_to_id[first]})")
        scores = _list(meta, "tokenizer.ggml.scores", path, n, (int, float), "numbers")
        scores = [float(s) for s in scores[:n]] if scores is not None else [0.0] * n
        types = _list(meta, "tokenizer.ggml.token_type", path, n, (int,), "integers")
        attrs = [_TYPE_ATTR.get(t, TokenAttr.UNDEFINED) for t in types[:n]] if types is not None \
            else [TokenAttr.NORMAL] * n

        # defaults of llama_vocab::impl::load, then the file's keys
        pre_name = meta.get("tokenizer.ggml.pre")
        if model_name == "llama":
            ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
            add_bos, add_eos, add_space_prefix, clean_spaces = True, False, True, False
            pre = None
        else:
            if "tokenizer.ggml.merges" not in meta:
                raise GGUFError(f"{path}: required metadata key 'tokenizer.ggml.merges' is missing")
            pre_name, pre = resolve_pre(pre_name, path)
            ids = {"bos": None if pre.no_bos else 11, "eos": 11}
            add_bos, add_eos, add_space_prefix, clean_spaces = pre.add_bos, False, False, pre.clean_spaces
        ids = _special_ids(meta, path, n, ids)
        add_space_prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", add_space_prefix, path)
        add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", add_bos, path)
        add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", add_eos, path)
        eog = _fix_special_attrs(tokens, token_to_id, attrs, ids)
        _strip_attrs(meta, pre_name, tokens, token_to_id, attrs)

        if model_name == "llama":
            model: BPEModel | SPMModel = SPMModel(token_to_id, scores, ids["unk"], path)
        else:
            merges = _list(meta, "tokenizer.ggml.merges", path, None, (str,), "strings")
            model = BPEModel(token_to_id, parse_merges(merges, path), pre_name, pre, path)
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise GGUFError(f"{path}: metadata key 'tokenizer.chat_template' must be a string")
        return cls(path=path, model_name=model_name, tokens=tokens, attrs=attrs, model=model, ids=ids,
                   add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix, clean_spaces=clean_spaces,
                   eog_ids=eog, chat_template=template)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self._ids["eot"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    def special_id(self, name: str) -> int | None:
        """'bos', 'eos', 'eot', 'eom', 'unk', 'sep', 'pad', 'mask', 'fim_pre', 'fim_suf', 'fim_mid', ..."""
        return self._ids[name]

    def is_eog(self, token_id: int) -> bool:
        """True for tokens that end generation (llama_vocab_is_eog)."""
        return token_id in self.eog_ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, {self.model_name}, {self.vocab_size:,} tokens)"

    # -- encoding -----------------------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token texts out of `text` (tokenizer_st_partition): a list of plain strings and ids."""
        fragments: list[str | int] = [text]
        for sid in self._special:
            attr = self.attrs[sid]
            if not parse_special and attr & _CONTROL_OR_UNKNOWN:
                continue
            needle = self.tokens[sid]
            if not any(isinstance(f, str) and needle in f for f in fragments):
                continue
            out: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or needle not in frag:
                    out.append(frag)
                    continue
                pos = 0
                while True:
                    match = frag.find(needle, pos)
                    if match == -1:
                        if pos < len(frag):
                            out.append(frag[pos:])
                        break
                    left = frag[pos:match]
                    if attr & TokenAttr.LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(sid)
                    pos = match + len(needle)
                    if attr & TokenAttr.RSTRIP:
                        while pos < len(frag) and frag[pos] in _C_SPACE:
                            pos += 1
            fragments = out
        return fragments

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`, exactly as llama.cpp's llama_tokenize(vocab, text, add_special, parse_special)."""
        fragments = self._partition(text, parse_special) if text else []
        out: list[int] = []
        bos = add_special and self.add_bos
        if bos:
            out.append(self._required("bos"))
        if self.model_name == "llama":
            prev_special = True  # a space is put before the first fragment and after each special token
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                else:
                    out += self._model.encode(frag, self.add_space_prefix and prev_special)
                    prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out += self._model.encode(frag)
        if add_special and self.add_eos:
            out.append(self._required("eos"))
        return out

    def _required(self, name: str) -> int:
        tid = self._ids[name]
        if tid is None:
            raise QkvggufError(f"{self.path}: tokenizer.ggml.add_{name}_token is true but the vocabulary has no "
                               f"{name.upper()} token")
        return tid

    # -- decoding -----------------------------------------------------------------------------------

    def token_to_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for (llama_token_to_piece); CONTROL/UNKNOWN tokens give b'' unless `special`."""
        key = (token_id, special)
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self._piece(token_id, special)
        return piece

    def _piece(self, token_id: int, special: bool) -> bytes:
        if not isinstance(token_id, int) or not 0 <= token_id < len(self.tokens):
            raise QkvggufError(f"{self.path}: token id {token_id!r} is outside the vocabulary "
                               f"of {len(self.tokens):,} tokens")
        attr, text = self.attrs[token_id], self.tokens[token_id]
        if attr & _CONTROL_OR_UNKNOWN and not special:
            return b""
        if attr & (_CONTROL_OR_UNKNOWN | TokenAttr.USER_DEFINED):
            return text.encode("utf-8", RAW)
        if attr & TokenAttr.NORMAL:
            if self.model_name == "llama":
                return text.replace(SPACE, " ").encode("utf-8", RAW)
            return byte_decode(text)
        if attr & TokenAttr.BYTE:
            return bytes([_hex_byte(text)])
        return b""  # UNUSED / UNDEFINED tokens print nothing

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text for `ids` as llama_detokenize(ids, remove_special=skip_special, unparse_special=not skip_special).

        The space that `add_space_prefix` put before the first word is dropped; with `skip_special`, a
        leading BOS / trailing EOS that encode() added is dropped too and other control tokens print nothing.
        Invalid UTF-8 (a sequence cut in the middle) becomes U+FFFD.
        """
        ids = list(ids)
        remove_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        out = bytearray()
        for tid in ids:
            piece = self.token_to_bytes(tid, special=not skip_special)
            if remove_space and piece[:1] == b" ":
                piece = piece[1:]
            remove_space = False
            out += piece
        if self.clean_spaces:
            out = _clean_spaces(out)
        return out.decode("utf-8", errors="replace")

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    # -- chat ---------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The file's chat template applied to `messages` (see chat.render_chat)."""
        if self.chat_template is None:
            raise QkvggufError(f"{self.path}: no chat template (metadata key 'tokenizer.chat_template' is missing)")
        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        try:
            return render_chat(self.chat_template, messages, bos, eos, add_generation_prompt, **extra)
        except QkvggufError as e:
            raise QkvggufError(f"{self.path}: {e}") from None


class StreamDecoder:
    """Token ids in, text out as soon as it is complete: an unfinished UTF-8 sequence waits for the next id.

        stream = tok.stream()
        for tid in generated:
            print(stream.feed(tid), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._pending = b""

    def feed(self, token_id: int) -> str:
        data = self._pending + self.tokenizer.token_to_bytes(token_id, special=not self.skip_special)
        cut = _complete_utf8_prefix(data)
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """Whatever is held back, with an incomplete sequence as U+FFFD."""
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of `data` without a trailing, possibly incomplete, UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            return len(data) - back if need > back else len(data)
    return len(data)


def _hex_byte(text: str) -> int:
    """token_to_byte: strtol(text.substr(3, 2), 16) of a '<0xNN>' token."""
    digits = ""
    for c in text[3:5]:
        if c not in "0123456789abcdefABCDEF":
            break
        digits += c
    return int(digits, 16) if digits else 0


def _fix_special_attrs(tokens: list[str], token_to_id: dict[str, int], attrs: list[TokenAttr],
                       ids: dict[str, int | None]) -> set[int]:
    """llama.cpp's token-text heuristics: find missing EOT/EOM/FIM ids, build the EOG set, fix attributes."""
    by_id = sorted(token_to_id.items(), key=lambda kv: kv[1])
    for name, texts in _DETECT.items():
        if ids[name] is None:
            found = [tid for text, tid in by_id if text in texts]
            if found:
                ids[name] = found[0]
                attrs[found[0]] |= TokenAttr.CONTROL
    for text, tid in by_id:  # control tokens named "unused..." are unused
        if attrs[tid] & TokenAttr.CONTROL and "unused" in text:
            attrs[tid] |= TokenAttr.UNUSED
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    for text, tid in by_id:
        if text in _EOG_TEXTS:
            eog.add(tid)
            attrs[tid] |= TokenAttr.CONTROL
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
        if text in token_to_id:
            attrs[token_to_id[text]] = TokenAttr.USER_DEFINED
    eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
    texts = {tokens[t]: t for t in eog}
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        eog.discard(texts["<|end|>"])  # harmony / solar-open: <|end|> ends a message, not generation
        attrs[texts["<|end|>"]] = TokenAttr.USER_DEFINED
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])  # gemma4 / plamo: </s> is a normal token
        attrs[texts["</s>"]] = TokenAttr.NORMAL
    return eog


def _strip_attrs(meta: dict, pre: str | None, tokens: list[str], token_to_id: dict[str, int],
                 attrs: list[TokenAttr]) -> None:
    """Per-model LSTRIP/RSTRIP attributes that llama.cpp sets by model name (spaces eaten next to a special token)."""
    name = str(meta.get("general.name", "")).lower()
    arch = str(meta.get("general.architecture", ""))
    if any(p in str(pre or "") for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) \
            or any(a in arch for a in ("nomic-bert-moe", "jina-bert-v3")):
        if "<mask>" in token_to_id:
            attrs[token_to_id["<mask>"]] |= TokenAttr.LSTRIP
    elif "phi-3" in name or "phi3" in name:
        for tid, attr in enumerate(attrs):
            if attr & _SPECIAL:
                attrs[tid] |= TokenAttr.RSTRIP
        for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            if text in token_to_id:
                tid = token_to_id[text]
                attrs[tid] = attrs[tid] | TokenAttr.RSTRIP if on else attrs[tid] & ~TokenAttr.RSTRIP
    elif "modern-bert" in name and "[MASK]" in token_to_id:
        attrs[token_to_id["[MASK]"]] |= TokenAttr.LSTRIP


def _clean_spaces(text: bytearray) -> bytearray:
    """llama.cpp's clean_up_tokenization_spaces passes, byte for byte (llama_vocab::impl::detokenize)."""
    t = bytearray(text)
    sp, ap = ord(" "), ord("'")
    # 1: " ?", " !", " .", " ,"
    total1, total = len(t), 1 if t else 0
    for i in range(1, total1):
        x = t[i]
        if t[i - 1] == sp and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # 2: a lone apostrophe between spaces
    total2, total = total, 1 if total else 0
    i = 1
    while i < total2:
        x = t[i]
        if x == ap and i + 1 < total2 and t[i - 1] == sp and t[i + 1] == sp:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # 3: " 's", " 'm", " 're", " 've"
    total3, total = total, 1 if total else 0
    for i in range(1, total3):
        x = t[i]
        if t[i - 1] == sp and x == ap and i + 1 < total3:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < total3 and (bytes(t[i + 1:i + 3]) in (b"re", b"ve")):
                total -= 1
        t[total] = x
        total += 1
    return t[:total]
