"""The llama.cpp engine's tokenizer and chat template (backends/llama_cpp.py's LlamaEngine):
read-only vocabulary calls, safe from any thread."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from localroute.backends.fragments import FragmentTokenizer

__all__ = ["LlamaVocab"]


class LlamaVocab:
    """Tokenising, detokenising and the GGUF's chat template for a loaded model (`_ll`, `_model`,
    `_vocab`, `n_vocab` set by the engine before `_read_vocab`)."""

    _ll: Any
    _model: Any
    _vocab: Any
    n_vocab: int

    def _read_vocab(self) -> None:
        """One pass over the vocabulary at start-up: end-of-generation tokens and token attributes."""
        ll = self._ll
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._eog = np.zeros(self.n_vocab, dtype=bool)
        self._attrs = np.zeros(self.n_vocab, dtype=np.int64)  # token attributes, for the fragment tokeniser
        for t in range(self.n_vocab):
            self._eog[t] = bool(ll.llama_vocab_is_eog(self._vocab, t))
            self._attrs[t] = int(ll.llama_vocab_get_attr(self._vocab, t))
        self._adds_special = bool(ll.llama_vocab_get_add_bos(self._vocab)) or bool(ll.llama_vocab_get_add_eos(self._vocab))
        self._fragments = self._fragment_tokenizer()

    def _fragment_tokenizer(self) -> FragmentTokenizer | None:
        """Per-fragment cached tokenising for chat prompts, where it is exactly llama.cpp's
        algorithm (backends/fragments.py); None where it is not."""
        ll = self._ll
        if int(ll.llama_vocab_type(self._vocab)) != ll.LLAMA_VOCAB_TYPE_BPE:
            return None
        special_attrs = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_USER_DEFINED | ll.LLAMA_TOKEN_ATTR_UNKNOWN
        special = np.flatnonzero(self._attrs & special_attrs)
        if np.any(self._attrs[special] & (ll.LLAMA_TOKEN_ATTR_LSTRIP | ll.LLAMA_TOKEN_ATTR_RSTRIP)):
            return None
        specials = [(ll.llama_vocab_get_text(self._vocab, int(t)) or b"", int(t)) for t in special]
        return FragmentTokenizer(lambda data, parse: self._llama_tokenize(data, False, parse), specials)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8", errors="replace")
        if parse_special and not (add_special and self._adds_special) and self._fragments is not None:
            return self._fragments.tokenize(data)
        return self._llama_tokenize(data, add_special, parse_special)

    def _llama_tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        n_max = len(data) + 8
        buf = (self._ll.llama_token * n_max)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (self._ll.llama_token * n_max)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        if not special and (cached := self._pieces.get(token)) is not None:
            return cached
        n = self._ll.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, special)
        out = bytes(self._piece_buf.raw[: max(n, 0)])
        if not special:
            self._pieces[token] = out
        return out

    def chat_template(self) -> str | None:
        raw = self._ll.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def special_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    @property
    def bos(self) -> int:
        return int(self._ll.llama_vocab_bos(self._vocab))

    @property
    def eos(self) -> int:
        return int(self._ll.llama_vocab_eos(self._vocab))
