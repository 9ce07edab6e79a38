"""GPT-2 style byte-level BPE (`tokenizer.ggml.model = 'gpt2'`), split and merged as llama.cpp does.

Encoding a fragment of plain text is three steps, each mirroring `llm_tokenizer_bpe_session`:

1. Pre-tokenize: the regexes llama.cpp lists for the file's `tokenizer.ggml.pre` (llama-vocab.cpp,
   `llm_tokenizer_bpe`) are applied in turn, each splitting every piece the previous one made
   (unicode.cpp, `unicode_regex_split`). llama.cpp runs them through std::regex on a "collapsed" copy
   of the text: every non-ASCII codepoint becomes one byte naming its class (0xD1 number, 0xD2 letter,
   0xD3 punctuation, 0xD4 mark, 0xD5 symbol, 0xD0 anything else, 0x0B whitespace), and `\\p{L}` in
   the regex becomes `[\\xD2A-Za-z]`. We do the same with Python's `re` in ASCII mode (`\\s` is then
   C's isspace), so the classes are llama.cpp's, not Python's. Text a regex leaves unmatched is a
   piece of its own. llama.cpp's hand-written fast paths for the gpt2/llama3/qwen2 regexes split
   exactly as the regexes do (the gpt2 one also takes a lone whitespace character the regex leaves
   unmatched, which comes to the same piece).
2. Byte-encode each piece (UTF-8 bytes mapped to GPT-2's printable alphabet).
3. Merge each piece by BPE rank. The `tokenizers` library does this: its merge order (lowest rank,
   then leftmost pair) is llama.cpp's, and `ignore_merges` (a piece that is itself a token is taken
   whole) is set where llama.cpp sets it.

Codepoint classes come from `unicodedata`, corrected for the codepoints that llama.cpp's table
(Unicode 15.1) assigns but Python 3.10's (Unicode 13.0) does not, so they agree on Python 3.10-3.13.
A Python with a newer Unicode than 15.1 (3.14+) classifies the newest codepoints where llama.cpp calls
them undefined: a known, tiny gap.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass

from ..errors import GGUFError, UnsupportedError

log = logging.getLogger(__name__)

# ---- codepoint classes, as llama.cpp's unicode-data.cpp has them ------------------------------------

# White_Space property (unicode-data.cpp, unicode_set_whitespace)
WHITESPACE = frozenset([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                        0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# collapsed class byte per general-category letter (unicode.cpp, k_ucat_cpt); others -> 0xD0
_CLASS_BYTE = {"N": 0xD1, "L": 0xD2, "P": 0xD3, "M": 0xD4, "S": 0xD5}
# llama.cpp's classes for codepoints that are unassigned (Cn) in Unicode 13.0 (Python 3.10) but assigned
# by 15.1 (llama.cpp's unicode-data.cpp): (first, last, category letter). Python 3.13 agrees without it.
_NEWER_UNICODE = [
    (0x061D, 0x061D, "P"), (0x0870, 0x0887, "L"), (0x0888, 0x0888, "S"), (0x0889, 0x088E, "L"),
    (0x0890, 0x0891, "C"), (0x0898, 0x089F, "M"), (0x08B5, 0x08B5, "L"), (0x08C8, 0x08C9, "L"),
    (0x08CA, 0x08D2, "M"), (0x0C3C, 0x0C3C, "M"), (0x0C5D, 0x0C5D, "L"), (0x0CDD, 0x0CDD, "L"),
    (0x0CF3, 0x0CF3, "M"), (0x0ECE, 0x0ECE, "M"), (0x170D, 0x170D, "L"), (0x1715, 0x1715, "M"),
    (0x171F, 0x171F, "L"), (0x180F, 0x180F, "M"), (0x1AC1, 0x1ACE, "M"), (0x1B4C, 0x1B4C, "L"),
    (0x1B7D, 0x1B7E, "P"), (0x1DFA, 0x1DFA, "M"), (0x20C0, 0x20C0, "S"), (0x2C2F, 0x2C2F, "L"),
    (0x2C5F, 0x2C5F, "L"), (0x2E53, 0x2E5D, "P"), (0x2FFC, 0x2FFF, "S"), (0x31EF, 0x31EF, "S"),
    (0x9FFD, 0x9FFF, "L"), (0xA7C0, 0xA7C1, "L"), (0xA7D0, 0xA7D1, "L"), (0xA7D3, 0xA7D3, "L"),
    (0xA7D5, 0xA7D9, "L"), (0xA7F2, 0xA7F4, "L"), (0xFBC2, 0xFBC2, "S"), (0xFD40, 0xFD4F, "S"),
    (0xFDCF, 0xFDCF, "S"), (0xFDFE, 0xFDFF, "S"), (0x10570, 0x1057A, "L"), (0x1057C, 0x1058A, "L"),
    (0x1058C, 0x10592, "L"), (0x10594, 0x10595, "L"), (0x10597, 0x105A1, "L"), (0x105A3, 0x105B1, "L"),
    (0x105B3, 0x105B9, "L"), (0x105BB, 0x105BC, "L"), (0x10780, 0x10785, "L"), (0x10787, 0x107B0, "L"),
    (0x107B2, 0x107BA, "L"), (0x10EFD, 0x10EFF, "M"), (0x10F70, 0x10F81, "L"), (0x10F82, 0x10F85, "M"),
    (0x10F86, 0x10F89, "P"), (0x11070, 0x11070, "M"), (0x11071, 0x11072, "L"), (0x11073, 0x11074, "M"),
    (0x11075, 0x11075, "L"), (0x110C2, 0x110C2, "M"), (0x1123F, 0x11240, "L"), (0x11241, 0x11241, "M"),
    (0x116B9, 0x116B9, "P"), (0x11740, 0x11746, "L"), (0x11AB0, 0x11ABF, "L"), (0x11B00, 0x11B09, "P"),
    (0x11F00, 0x11F01, "M"), (0x11F02, 0x11F02, "L"), (0x11F03, 0x11F03, "M"), (0x11F04, 0x11F10, "L"),
    (0x11F12, 0x11F33, "L"), (0x11F34, 0x11F3A, "M"), (0x11F3E, 0x11F42, "M"), (0x11F43, 0x11F4F, "P"),
    (0x11F50, 0x11F59, "N"), (0x12F90, 0x12FF0, "L"), (0x12FF1, 0x12FF2, "P"), (0x1342F, 0x1342F, "L"),
    (0x13439, 0x1343F, "C"), (0x13440, 0x13440, "M"), (0x13441, 0x13446, "L"), (0x13447, 0x13455, "M"),
    (0x16A70, 0x16ABE, "L"), (0x16AC0, 0x16AC9, "N"), (0x1AFF0, 0x1AFF3, "L"), (0x1AFF5, 0x1AFFB, "L"),
    (0x1AFFD, 0x1AFFE, "L"), (0x1B11F, 0x1B122, "L"), (0x1B132, 0x1B132, "L"), (0x1B155, 0x1B155, "L"),
    (0x1CF00, 0x1CF2D, "M"), (0x1CF30, 0x1CF46, "M"), (0x1CF50, 0x1CFC3, "S"), (0x1D1E9, 0x1D1EA, "S"),
    (0x1D2C0, 0x1D2D3, "N"), (0x1DF00, 0x1DF1E, "L"), (0x1DF25, 0x1DF2A, "L"), (0x1E030, 0x1E06D, "L"),
    (0x1E08F, 0x1E08F, "M"), (0x1E290, 0x1E2AD, "L"), (0x1E2AE, 0x1E2AE, "M"), (0x1E4D0, 0x1E4EB, "L"),
    (0x1E4EC, 0x1E4EF, "M"), (0x1E4F0, 0x1E4F9, "N"), (0x1E7E0, 0x1E7E6, "L"), (0x1E7E8, 0x1E7EB, "L"),
    (0x1E7ED, 0x1E7EE, "L"), (0x1E7F0, 0x1E7FE, "L"), (0x1F6DC, 0x1F6DF, "S"), (0x1F774, 0x1F776, "S"),
    (0x1F77B, 0x1F77F, "S"), (0x1F7D9, 0x1F7D9, "S"), (0x1F7F0, 0x1F7F0, "S"), (0x1F979, 0x1F979, "S"),
    (0x1F9CC, 0x1F9CC, "S"), (0x1FA75, 0x1FA77, "S"), (0x1FA7B, 0x1FA7C, "S"), (0x1FA87, 0x1FA88, "S"),
    (0x1FAA9, 0x1FAAF, "S"), (0x1FAB7, 0x1FABD, "S"), (0x1FABF, 0x1FABF, "S"), (0x1FAC3, 0x1FAC5, "S"),
    (0x1FACE, 0x1FACF, "S"), (0x1FAD7, 0x1FADB, "S"), (0x1FAE0, 0x1FAE8, "S"), (0x1FAF0, 0x1FAF8, "S"),
    (0x2A6DE, 0x2A6DF, "L"), (0x2B735, 0x2B739, "L"), (0x2EBF0, 0x2EE5D, "L"), (0x31350, 0x323AF, "L"),
]
_NEWER_STARTS = [r[0] for r in _NEWER_UNICODE]


def category_letter(cp: int) -> str:
    """llama.cpp's general category of a codepoint: 'L', 'N', 'P', 'M', 'S', 'Z', 'C', or 'Cn' (undefined)."""
    cat = unicodedata.category(chr(cp))
    if cat == "Cn":
        i = bisect_right(_NEWER_STARTS, cp) - 1
        if i >= 0 and cp <= _NEWER_UNICODE[i][1]:
            return _NEWER_UNICODE[i][2]
        return "Cn"
    return cat[0]


class _Collapse(dict):
    """str.translate table: ASCII stays, other codepoints become llama.cpp's class byte (filled lazily)."""

    def __init__(self):
        super().__init__((i, i) for i in range(128))

    def __missing__(self, cp: int) -> int:
        value = 0x0B if cp in WHITESPACE else _CLASS_BYTE.get(category_letter(cp), 0xD0)
        self[cp] = value
        return value


class _WideSpaces(dict):
    """str.translate table for regexes without \\p{..}: non-ASCII whitespace becomes 0x0B (llama.cpp's wregex path)."""

    def __missing__(self, cp: int) -> int:
        value = 0x0B if cp > 0x7F and cp in WHITESPACE else cp
        self[cp] = value
        return value


_COLLAPSE = _Collapse()
_WIDE = _WideSpaces()

# ---- the regexes, verbatim from llama-vocab.cpp (llm_tokenizer_bpe) --------------------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_BLOOM = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_DEEPSEEK3_MAIN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER_LOWER = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
                r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*")
_LU, _LL = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_YOUTU_WORD = (r"[^\r\n\p{L}\p{N}]?" + _LU + "*" + _LL + "+" + _CONTRACTIONS + "?"
               r"|[^\r\n\p{L}\p{N}]?" + _LU + "+" + _LL + "*" + _CONTRACTIONS + "?")
_CJK = r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"  # CJK ideographs, hiragana, katakana
_CJK_KO = r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"

PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama3": [LLAMA3],
    "jais2": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
              r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"],
    "deepseek-llm": [
        r"[\r\n]",
        r"\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
        r"\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
        r"\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
        r"\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
        r"\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
        r"\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
        r"\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
        r"\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
        r"\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        r"\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        r"\U0001e900-\U0001e943]+",
        r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        _CJK_KO,
        r"\p{N}+",
    ],
    "deepseek-v3": [r"\p{N}{1,3}", _CJK, _DEEPSEEK3_MAIN],
    "spark2_5": [r"\p{N}{1,3}", _CJK,
                 r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                 r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"],
    "youtu": [r"[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c"
              r"\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|" + _CJK,
              _YOUTU_WORD + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_KO, r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
    "starcoder": [r"\p{N}", GPT2],
    "gpt2": [GPT2],
    "qwen2": [QWEN2],
    "qwen35": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "bloom": [_BLOOM],
    "viking": [_BLOOM, r"\p{N}"],
    "tekken": [_UPPER_LOWER + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "chameleon": [r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", GPT2],
    "gpt4o": [r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
              r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "granite-emb-multi": [
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+" + _CONTRACTIONS + "?"
        r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*" + _CONTRACTIONS + "?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "bailingmoe": [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
    "seed-coder": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+"],
    "ufakzeka": [r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "laguna": [r"[^\n]+|[\n]+", QWEN2],
    "exaone-moe": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"],
    "minicpm5": [r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


@dataclass(frozen=True)
class PreTokenizer:
    """What a `tokenizer.ggml.pre` value selects in llama.cpp (llama_vocab::impl::load)."""

    regexes: str  # key of PRE_REGEXES
    ignore_merges: bool = False  # a piece that is itself a token is not merged
    add_bos: bool = False  # default when tokenizer.ggml.add_bos_token is absent
    clean_spaces: bool = True  # detokenize removes " ," " ." " 's" ... (clean_up_tokenization_spaces)
    no_bos: bool = False  # the BOS id defaults to none


_P = PreTokenizer
_LLAMA3 = _P("llama3", ignore_merges=True, add_bos=True)
_NC = dict(clean_spaces=False)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _P("default"),
    "minicpm5": _P("minicpm5", ignore_merges=True),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], _LLAMA3),
    "deepseek-llm": _P("deepseek-llm", **_NC),
    "deepseek-coder": _P("deepseek-coder", **_NC),
    "deepseek-v3": _P("deepseek-v3", **_NC),
    "spark2_5": _P("spark2_5", **_NC),
    "youtu": _P("youtu", ignore_merges=True, **_NC),
    "falcon": _P("falcon"),
    "mpt": _P("gpt2"),
    "starcoder": _P("starcoder"),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "olmo", "jais",
                     "exaone4"], _P("gpt2")),
    "jais-2": _P("jais2"),
    "refact": _P("starcoder"),
    "command-r": _P("starcoder", **_NC),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"],
                    _P("qwen2", **_NC)),
    "qwen35": _P("qwen35", **_NC),
    "stablelm2": _P("qwen2"),
    "megrez": _P("qwen2"),
    "dbrx": _P("llama3"),
    "smaug-bpe": _P("llama3"),
    "poro-chat": _P("bloom", **_NC),
    "chatglm-bpe": _P("llama3", no_bos=True),
    **dict.fromkeys(["glm4", "glm5"], _P("llama3", ignore_merges=True, no_bos=True)),
    "viking": _P("viking", **_NC),
    "tekken": _P("tekken", ignore_merges=True, add_bos=True, **_NC),
    "smollm": _P("starcoder", **_NC),
    "codeshell": _P("starcoder"),
    "bloom": _P("bloom"),
    "gpt3-finnish": _P("bloom"),
    "exaone": _P("starcoder"),
    "exaone-moe": _P("exaone-moe"),
    "chameleon": _P("chameleon", add_bos=True, **_NC),
    "minerva-7b": _P("starcoder"),
    "mellum2": _P("starcoder"),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _P("gpt4o", **_NC)),
    "granite-embed-multi-97m": _P("granite-emb-multi", ignore_merges=True, **_NC),
    **dict.fromkeys(["trillion", "granite-docling"], _P("gpt2", **_NC)),
    **dict.fromkeys(["bailingmoe", "bailingmoe2", "llada-moe"], _P("bailingmoe", **_NC)),
    "seed-coder": _P("seed-coder", **_NC),
    **dict.fromkeys(["hunyuan-dense", "hy_v4", "joyai-llm"], _P("deepseek-v3", **_NC)),
    "ufakzeka": _P("ufakzeka", **_NC),
    "grok-2": _P("qwen2", **_NC),
    "laguna": _P("laguna", **_NC),
}

# ---- regex translation (unicode.cpp, unicode_regex_split) -------------------------------------------

_UCAT = {r"\p{N}": "N", r"\p{L}": "L", r"\p{P}": "P", r"\p{M}": "M", r"\p{S}": "S",
         r"\p{Lu}": "L", r"\p{Ll}": "L", r"\p{Lt}": "L", r"\p{Lm}": "L", r"\p{Lo}": "L"}
# the class byte, then the ASCII members of the class (k_ucat_map)
_UCAT_CLASS = {
    "N": "\xD1" + r"0-9",
    "L": "\xD2" + r"A-Za-z",
    "P": "\xD3" + r"!-#%-*,-/:-;?-@\[-\]_\{\}",
    "M": "\xD4",
    "S": "\xD5" + r"\$\+<->\^`\|\~",
}


def _collapse_regex(expr: str) -> str:
    """Replace \\p{..} by the collapsed class, as unicode_regex_split does (inside [] without brackets)."""
    out, inside, i = [], False, 0
    while i < len(expr):
        ch = expr[i]
        if ch == "[" and (i == 0 or expr[i - 1] != "\\"):
            out.append("[")
            inside = True
        elif inside and ch == "]" and expr[i - 1] != "\\":
            out.append("]")
            inside = False
        elif expr.startswith("\\p{", i) and i + 3 < len(expr):
            close = expr.find("}", i + 3)
            if close != -1 and close <= i + 10 and expr[i:close + 1] in _UCAT:
                members = _UCAT_CLASS[_UCAT[expr[i:close + 1]]]
                out.append(members if inside else "[" + members + "]")
                i = close + 1
                continue
            out.append(ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Split:
    pattern: re.Pattern
    collapsed: bool  # match against the collapsed text (the regex uses \p{..})


def compile_splits(regexes: list[str]) -> list[_Split]:
    splits = []
    for expr in regexes:
        if expr.endswith("$"):  # ECMAScript '$' is the end of input; Python's also matches before a final \n
            expr = expr[:-1] + r"\Z"
        collapsed = any(cat in expr for cat in _UCAT)
        pattern = _collapse_regex(expr) if collapsed else expr
        splits.append(_Split(re.compile(pattern, re.ASCII), collapsed))
    return splits


def split_words(text: str, splits: list[_Split]) -> list[str]:
    """Pre-tokenize: each regex splits every piece left by the previous ones; text between matches stays a piece."""
    subjects = {}  # the text as each kind of regex sees it, made once
    bounds = [0, len(text)]  # piece i is text[bounds[i]:bounds[i+1]]
    for split in splits:
        if split.collapsed not in subjects:
            subjects[split.collapsed] = text.translate(_COLLAPSE if split.collapsed else _WIDE)
        subject = subjects[split.collapsed]
        finditer = split.pattern.finditer
        new = [0]
        for start, end in zip(bounds, bounds[1:]):
            for m in finditer(subject, start, end):
                a, b = m.span()
                if a > new[-1]:
                    new.append(a)
                new.append(b)  # an empty match gives an empty piece, as in llama.cpp
            if end > new[-1]:
                new.append(end)
        bounds = new
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# ---- GPT-2's byte <-> printable-character map (unicode.cpp, unicode_byte_to_utf8_map) ---------------

def _byte_chars() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


BYTE_CHARS = _byte_chars()  # byte value -> character in GPT-2 vocab strings
CHAR_BYTES = {c: b for b, c in enumerate(BYTE_CHARS)}
_LATIN1_TO_BYTE_CHARS = {b: c for b, c in enumerate(BYTE_CHARS)}


def byte_encode(word: str) -> str:
    return word.encode("utf-8", "surrogateescape").decode("latin-1").translate(_LATIN1_TO_BYTE_CHARS)


def byte_decode(token_text: str) -> bytes:
    """A NORMAL token's bytes (llama_decode_text): characters outside the byte alphabet become a marker."""
    try:
        return bytes(CHAR_BYTES[c] for c in token_text)
    except KeyError:
        pass
    out = bytearray()
    for c in token_text:
        if c in CHAR_BYTES:
            out.append(CHAR_BYTES[c])
        else:  # llama.cpp writes the unknown character's UTF-8 in hex, then the whole token text
            out += ("[UNK_BYTE_0x" + c.encode("utf-8", "surrogateescape").hex() + token_text + "]").encode(
                "utf-8", "surrogateescape")
    return bytes(out)


# ---- the model --------------------------------------------------------------------------------------

def parse_merges(merges: list, path: str) -> list[tuple[str, str]]:
    """'a b' -> ('a', 'b'), split at the first space after the first character; first occurrence wins."""
    pairs, seen = [], set()
    for i, merge in enumerate(merges):
        if not isinstance(merge, str):
            raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.merges' entry {i} is {type(merge).__name__}, "
                            "expected a string")
        pos = merge.find(" ", 1)
        if pos == -1:  # llama.cpp records an unusable ('', '') pair
            continue
        pair = (merge[:pos], merge[pos + 1:])
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


class BPEModel:
    """Byte-level BPE over pre-tokenized pieces: `encode(text)` for one fragment without special tokens."""

    def __init__(self, token_to_id: dict[str, int], merges: list[tuple[str, str]], pre: str,
                 pre_tokenizer: PreTokenizer, path: str):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models

        usable = [(a, b) for a, b in merges if a in token_to_id and b in token_to_id and a + b in token_to_id]
        if len(usable) != len(merges):
            # llama.cpp would apply such a merge and then spell the unknown result out byte by byte
            log.warning("%s: %d of %d BPE merges name tokens missing from the vocabulary; they are ignored",
                        path, len(merges) - len(usable), len(merges))
        self.pre = pre
        self.pre_tokenizer = pre_tokenizer
        self.splits = compile_splits(PRE_REGEXES[pre_tokenizer.regexes])
        model = models.BPE(vocab=token_to_id, merges=usable, ignore_merges=pre_tokenizer.ignore_merges,
                           fuse_unk=False, byte_fallback=False)
        self._hf = HFTokenizer(model)

    def encode(self, text: str) -> list[int]:
        words = [byte_encode(w) for w in split_words(text, self.splits) if w]
        if not words:
            return []
        return self._hf.encode(words, is_pretokenized=True, add_special_tokens=False).ids


def resolve_pre(pre: str | None, path: str) -> tuple[str, PreTokenizer]:
    if pre is None or pre == "":
        log.warning("%s: metadata key 'tokenizer.ggml.pre' is missing or empty; using 'default' as llama.cpp does "
                    "(tokenization may differ from the original model's)", path)
        pre = "default"
    if not isinstance(pre, str):
        raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.pre' is {type(pre).__name__}, expected a string")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedError(f"{path}: tokenizer.ggml.pre '{pre}' is not supported "
                               f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    return pre, PRE_TOKENIZERS[pre]
