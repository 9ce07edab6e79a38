"""SentencePiece-style vocabularies (`tokenizer.ggml.model = 'llama'`): llama.cpp's `llm_tokenizer_spm`.

A fragment of plain text is tokenized whole, without splitting it into words first:

1. ' ' becomes '\u2581' (and one is put in front when `add_space_prefix` says so and the fragment
   starts the text or follows a special token; the caller decides that).
2. Every character starts as its own symbol. A heap holds each adjacent pair whose concatenation is
   a token, keyed by that token's score (highest first, then leftmost). Popping a pair merges it
   unless one side has changed since it was pushed; the new neighbours are pushed in turn.
3. Each final symbol is its token, or, when a single character is not in the vocabulary, its UTF-8
   bytes as `<0xNN>` byte tokens (byte fallback).

llama.cpp's `resegment` also keeps a reverse-merge map to split unknown merged symbols; a symbol is
only ever merged into a string that is a token, so that branch never runs and is left out here.
"""

from __future__ import annotations

import heapq

from ..errors import QkvggufError

SPACE = "\u2581"  # LOWER ONE EIGHTH BLOCK, SentencePiece's visible space


class SPMModel:
    """Score-driven bigram merging over a vocabulary with scores: `encode(fragment)` gives token ids."""

    def __init__(self, token_to_id: dict[str, int], scores: list[float], unk_id: int | None, path: str):
        self.token_to_id = token_to_id
        self.scores = scores
        self.path = path
        self.unk_id = unk_id
        # byte -> token (llama_vocab::byte_to_token): '<0xNN>', else the byte itself as a 1-char token
        self.byte_ids: list[int | None] = []
        for b in range(256):
            tid = token_to_id.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = token_to_id.get(chr(b))
            self.byte_ids.append(tid)

    def _byte_token(self, b: int) -> int:
        tid = self.byte_ids[b]
        if tid is None:
            # llama.cpp throws (std::out_of_range) here; SentencePiece without byte fallback emits <unk>
            if self.unk_id is None:
                raise QkvggufError(f"{self.path}: byte 0x{b:02X} has no token (no '<0x{b:02X}>' and no unknown "
                                   "token) and cannot be encoded")
            return self.unk_id
        return tid

    def encode(self, text: str, add_space_prefix: bool) -> list[int]:
        if add_space_prefix:
            text = " " + text
        text = text.replace(" ", SPACE)
        n = len(text)
        if n == 0:
            return []
        token_to_id, scores = self.token_to_id, self.scores
        start = list(range(n))  # symbol i covers text[start[i] : start[i] + length[i]]
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, size, right)

        def try_add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            size = length[left] + length[right]
            tid = token_to_id.get(text[start[left]:start[left] + size])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, size, right))

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, size, right = heapq.heappop(heap)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue  # one side was merged elsewhere since this pair was pushed
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])

        out: list[int] = []
        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + length[i]]
            tid = token_to_id.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_token(b) for b in piece.encode("utf-8", "surrogateescape"))
            i = nxt[i]
        return out
