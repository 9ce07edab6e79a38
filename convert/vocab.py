"""The vocabulary of a Hugging Face folder, as the `tokenizer.ggml.*` keys llama.cpp reads.

Two kinds, chosen as llama.cpp's convert_hf_to_gguf.py chooses for the llama and qwen families:
- `tokenizer.model` (SentencePiece) -> `tokenizer.ggml.model = "llama"`, pre "default": pieces,
  scores and token types (normal / unknown / control / byte / unused; user-defined and control for
  tokens added in tokenizer_config.json), plus `add_space_prefix` (SentencePiece's dummy prefix).
- otherwise `tokenizer.json` with a byte-level BPE model -> `"gpt2"`: tokens, merges, token types
  (added tokens: control when special or special-looking, else user-defined), and
  `tokenizer.ggml.pre` identified by hashing the token ids of a check string (bpe_pre.py), or
  given by the caller (`vocab_pre`). An unknown hash is an error that suggests `--vocab-pre NAME`.
Ids past the tokenizer's end, up to config.json's `vocab_size`, are filled with `[PAD{i}]` (unused).

Special tokens (bos, eos, unk, pad): the strings in tokenizer_config.json resolved to ids, then
`{kind}_token_id` from config.json, then generation_config.json (a list of eos ids gives its first),
then the SentencePiece model's own ids. add_bos/add_sep/add_eos: a `TemplateProcessing` post-processor
in tokenizer.json decides (as in llama.cpp; add_sep from its `pair` template), else
tokenizer_config.json's `add_bos_token` / `add_sep_token` / `add_eos_token`. The chat template
comes from tokenizer_config.json, chat_template.jinja or chat_template.json.

Differences from llama.cpp's converter, known and accepted for now: the check string is encoded
with the `tokenizers` library (with special tokens), not transformers' AutoTokenizer (the two agree
for fast tokenizers whose tokenizer.json carries the post-processor); added tokens that are not
"normalized" are not re-encoded; SentencePiece-style BPE tokenizer.json files (byte_fallback, no
tokenizer.model) are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import gguf
from gguf import TokenType

from qkvgguf.errors import QkvggufError, UnsupportedError, shown

from .bpe_pre import CHECK_TEXT, HASHES, check_hash
from .checkpoint import read_json

log = logging.getLogger(__name__)

SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


class VocabError(QkvggufError):
    """No tokenizer, a malformed one, or one whose pre-tokenizer llama.cpp would not know."""


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    scores: Optional[list[float]] = None  # SentencePiece only
    merges: Optional[list[str]] = None  # BPE only: "left right"
    special: dict[str, int] = field(default_factory=dict)  # kind -> id
    add_bos: Optional[bool] = None
    add_sep: Optional[bool] = None
    add_eos: Optional[bool] = None
    add_space_prefix: Optional[bool] = None
    chat_template: Optional[str] = None
    source: str = ""  # the file the tokens came from

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.token_types)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        for kind, token_id in self.special.items():
            getattr(w, f"add_{kind}_token_id")(token_id)  # uint32
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_sep is not None:
            w.add_add_sep_token(self.add_sep)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)


def looks_special(token: str) -> bool:
    """llama.cpp's `does_token_look_special`: added tokens that act as control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise VocabError(f"{path}: expected a JSON object")
    return data


def _token_content(entry: Any) -> Optional[str]:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _is_id(v: Any, vocab_size: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < max(vocab_size, 1 << 24)


def _check_size(path: Path, n_tokens: int, vocab_size: int) -> None:
    if n_tokens > vocab_size:
        raise VocabError(f"{path}: tokenizer has {n_tokens:,} tokens but config.json vocab_size is {vocab_size:,}")


def _pad(tokens: list[str], types: list[int], scores: Optional[list[float]], vocab_size: int) -> None:
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-10000.0)


# -- SentencePiece ---------------------------------------------------------------------------------


def sentencepiece_vocab(path: Path, vocab_size: int, tok_config: dict[str, Any]) -> tuple[Vocab, dict[str, int]]:
    """tokenizer.model -> (vocab, the model's own special ids)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise VocabError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    n = sp.vocab_size()
    _check_size(path, n, vocab_size)
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                     else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                     else TokenType.NORMAL)
    _pad(tokens, types, scores, vocab_size)
    # tokens added on top of the SentencePiece model (as llama.cpp: score -1000, control or user-defined)
    decoder = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict) or not all(isinstance(k, str) and k.isdigit() and isinstance(v, dict)
                                                for k, v in decoder.items()):
        raise VocabError(f"{path.parent / 'tokenizer_config.json'}: 'added_tokens_decoder' should map ids to "
                         f"token objects, found {shown(decoder)}")
    added = {int(k): v for k, v in decoder.items()}
    for key, i in (_optional_json(path.parent / "added_tokens.json")).items():
        if not _is_id(i, vocab_size):
            raise VocabError(f"{path.parent / 'added_tokens.json'}: token {shown(key)} has id {shown(i)}")
        added.setdefault(i, {"content": key, "special": False})
    for i, entry in sorted(added.items()):
        content = _token_content(entry)
        if content is None or not 0 <= i < vocab_size:
            continue
        special = entry.get("special") or looks_special(content)
        tokens[i] = content if special else content.replace("\u2581", " ")
        types[i] = TokenType.CONTROL if special else TokenType.USER_DEFINED
        scores[i] = -1000.0
    pieces = sp.encode("a", out_type=str)  # a dummy prefix shows up as a leading "▁"
    add_space_prefix = tok_config.get("add_prefix_space", bool(pieces) and pieces[0].startswith("\u2581"))
    own = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    vocab = Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=bool(add_space_prefix),
                  source=str(path))
    return vocab, {k: v for k, v in own.items() if 0 <= v < vocab_size}


# -- byte-level BPE (tokenizer.json) ---------------------------------------------------------------


def _merges(path: Path, raw: Any) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise VocabError(f"{path}: BPE model has no merges")
    if all(isinstance(m, str) for m in raw):
        return raw
    if all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in raw):
        # newer tokenizers: [left, right]; spaces as U+0120
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in raw]
    bad = next(m for m in raw if not isinstance(m, (str, list)) or isinstance(m, list) and (
        len(m) != 2 or not all(isinstance(p, str) for p in m)))
    raise VocabError(f"{path}: merges must be strings 'a b' or pairs of strings, found {shown(bad)}")


def bpe_pre(path: Path, vocab_pre: Optional[str]) -> str:
    """tokenizer.ggml.pre: the caller's name, else the one llama.cpp would find by hashing."""
    if vocab_pre is not None:
        return vocab_pre
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(str(path)).encode(CHECK_TEXT).ids
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise VocabError(f"{path}: cannot load with the tokenizers library ({str(e).splitlines()[0]})") from None
    digest = check_hash(ids)
    if digest not in HASHES:
        raise VocabError(f"{path}: BPE pre-tokenizer not recognized (check hash {digest[:16]}...); "
                         f"pass --vocab-pre NAME (e.g. llama-bpe, qwen2, smollm, gpt-2)")
    return HASHES[digest]


def bpe_vocab(path: Path, vocab_size: int, vocab_pre: Optional[str]) -> Vocab:
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise VocabError(f"{path}: no 'model.vocab' table")
    if model.get("type", "BPE") != "BPE":
        raise UnsupportedError(f"{path}: tokenizer model '{model.get('type')}' is not supported (supported: BPE)")
    if model.get("byte_fallback"):
        raise UnsupportedError(f"{path}: SentencePiece-style BPE (byte_fallback) without tokenizer.model "
                               "is not supported yet")
    by_id: dict[int, str] = {}
    for t, i in model["vocab"].items():
        if not _is_id(i, vocab_size):
            raise VocabError(f"{path}: model.vocab gives token {shown(t)} the id {shown(i)}, expected an integer "
                             f"in [0, {vocab_size:,})")
        by_id[i] = t
    added_list = data.get("added_tokens") or []
    if not isinstance(added_list, list):
        raise VocabError(f"{path}: 'added_tokens' should be a list, found {shown(added_list)}")
    added = {}
    for a in added_list:
        if not isinstance(a, dict) or not _is_id(a.get("id"), vocab_size) or not isinstance(a.get("content"), str):
            raise VocabError(f"{path}: added token {shown(a)} needs an integer 'id' in [0, {vocab_size:,}) "
                             "and a string 'content'")
        added[a["id"]] = a
        by_id[a["id"]] = a["content"]
    n = max(by_id) + 1 if by_id else 0
    _check_size(path, n, vocab_size)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            special = added[i].get("special") or looks_special(by_id[i])
            tokens.append(by_id[i] if special else by_id[i].replace("\u2581", " "))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    _pad(tokens, types, None, vocab_size)
    return Vocab("gpt2", bpe_pre(path, vocab_pre), tokens, types, merges=_merges(path, model.get("merges")),
                 source=str(path))


def _special_id(entry: Any) -> Optional[str]:
    return entry.get("SpecialToken", {}).get("id") if isinstance(entry, dict) else None


def _pair_separator(pair: list, first: Optional[str], last: Optional[str], special_text: dict[str, str]) -> Optional[bool]:
    """add_sep from a `pair` template `[first] A [sep] [eos] B [last]`, as llama.cpp's SpecialVocab reads it:
    True when the token between A and B is the sep or eos token (the first of two only without a
    trailing special in `single`); None when the template is not of that form."""
    start = 1 if first and pair and _special_id(pair[0]) == first else 0
    stop = -1 if last and pair and _special_id(pair[-1]) == last else None
    middle = pair[start:stop]
    if not middle:
        return None
    a, b = (middle[0].get("Sequence", {}).get("id"), middle[-1].get("Sequence", {}).get("id"))
    inner = middle[1:-1]
    if a != "A" or b != "B" or not inner:
        return None
    seps = {t for t in (special_text.get("sep"), special_text.get("eos")) if t}
    add = bool(_special_id(inner[0]) in seps and not last)
    if len(inner) == 2 and _special_id(inner[1]) in seps:
        add = True
    return add


def _post_processor_adds(tokenizer_json: dict[str, Any], special_text: dict[str, str]) -> dict[str, bool]:
    """add_bos/add_sep/add_eos implied by tokenizer.json's post-processor (llama.cpp lets it win)."""
    found: dict[str, bool] = {}
    post = tokenizer_json.get("post_processor") or {} if isinstance(tokenizer_json, dict) else {}
    procs = post.get("processors", [post]) if isinstance(post, dict) else None
    if not isinstance(procs, list) or not all(isinstance(p, dict) for p in procs):
        raise VocabError(f"tokenizer.json: malformed 'post_processor' {shown(post)}")
    for proc in procs:
        single = proc.get("single") or []
        if proc.get("type") == "TemplateProcessing" and (not isinstance(single, list) or not all(
                isinstance(x, dict) and isinstance(x.get("SpecialToken", {}), dict) for x in single)):
            raise VocabError(f"tokenizer.json: malformed TemplateProcessing 'single' {shown(single)}")
        if proc.get("type") == "ByteLevel":
            found.setdefault("bos", False)
            found.setdefault("eos", False)
        elif proc.get("type") == "TemplateProcessing":
            single, first, last = proc.get("single") or [], None, None
            if len(single) > 1:
                first, last = _special_id(single[0]), _special_id(single[-1])
                if first:
                    found["bos"] = first == special_text.get("bos")
                if last:
                    found["eos"] = last == special_text.get("eos")
            sep = _pair_separator(proc.get("pair") or [], first, last, special_text)
            if sep is not None:
                found["sep"] = sep
    return found


# -- the folder ------------------------------------------------------------------------------------


def load_vocab(folder: Path, vocab_size: int, vocab_pre: Optional[str] = None) -> Vocab:
    folder = Path(folder)
    tok_config = _optional_json(folder / "tokenizer_config.json")
    tokenizer_json = folder / "tokenizer.json"
    own_ids: dict[str, int] = {}
    if (folder / "tokenizer.model").is_file():
        vocab, own_ids = sentencepiece_vocab(folder / "tokenizer.model", vocab_size, tok_config)
        if vocab_pre is not None:
            vocab.pre = vocab_pre
    elif tokenizer_json.is_file():
        vocab = bpe_vocab(tokenizer_json, vocab_size, vocab_pre)
    else:
        raise VocabError(f"{folder}: no tokenizer found (expected tokenizer.model or tokenizer.json)")

    # special token ids, first source wins
    text = {k: t for k in SPECIAL_KINDS if (t := _token_content(tok_config.get(f"{k}_token"))) is not None}
    index = {t: i for i, t in enumerate(vocab.tokens)}
    sources = [{k: index[t] for k, t in text.items() if t in index}]
    for name in ("config.json", "generation_config.json"):
        cfg = _optional_json(folder / name)
        ids = {}
        for k in SPECIAL_KINDS:
            v = cfg.get(f"{k}_token_id")
            v = v[0] if isinstance(v, list) and v else v
            if isinstance(v, int) and not isinstance(v, bool):
                ids[k] = v
        sources.append(ids)
    sources.append(own_ids)
    for ids in sources:
        for k, v in ids.items():
            if k not in vocab.special and 0 <= v < vocab_size:
                vocab.special[k] = v
    vocab.special = {k: vocab.special[k] for k in SPECIAL_KINDS if k in vocab.special}

    sep = _token_content(tok_config.get("sep_token"))
    with_sep = {**text, **({"sep": sep} if sep is not None else {})}
    adds = _post_processor_adds(read_json(tokenizer_json), with_sep) if tokenizer_json.is_file() else {}
    for k in ("bos", "sep", "eos"):
        if k not in adds and isinstance(tok_config.get(f"add_{k}_token"), bool):
            adds[k] = tok_config[f"add_{k}_token"]
    vocab.add_bos, vocab.add_sep, vocab.add_eos = adds.get("bos"), adds.get("sep"), adds.get("eos")
    if isinstance(tok_config.get("add_prefix_space"), bool):  # llama.cpp copies it for any vocab kind
        vocab.add_space_prefix = tok_config["add_prefix_space"]

    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _optional_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp's default slot
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise VocabError(f"{folder}: chat_template should be a string (or a list of named templates), "
                         f"found {shown(template)}")
    if isinstance(template, str):
        from qkvgguf.tokenizer.chat import check_template

        check_template(template, f"{folder}: chat_template")  # one that does not parse is refused here
        vocab.chat_template = template
    log.info("vocab: %s, %d tokens, pre %s, special %s", vocab.model, len(vocab.tokens), vocab.pre, vocab.special)
    return vocab
