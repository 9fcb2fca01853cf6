"""Tokenizers of model servers whose token ids epp can reproduce exactly from the prompt text.

``LlmdSimTokenizer`` is llm-d-inference-sim's dummy tokenizer (``--force-dummy-tokenizer``,
or any ``--model`` that is not a Hugging Face model), as of v0.10.2
(``pkg/tokenizer/tokenizer.go``): the text is split with the Go regular expression::

    (\\{|\\}|:|,|-|\\.|\\?|\\!|;|@|#|\\$|%|\\^|&|\\*|\\(|\\)|\\+|\\-|_|~|/|\\\\|>|<|\\[|\\]|=|"|'|\\w+)(\\s*)

(``FindAllString``: one punctuation character or a run of word characters, each with the
whitespace after it; anything else, as non-ASCII letters, is skipped) and each piece,
trailing whitespace included, becomes the 32-bit FNV-1a hash of its UTF-8 bytes.  Go's
``\\w`` is ``[0-9A-Za-z_]`` and ``\\s`` is ``[\\t\\n\\f\\r ]`` (ASCII only, no ``\\v``), so the
pattern below spells those classes out; Go's leftmost-first alternation is Python's, so a
lone ``_`` before a word is its own token in both (``_`` comes before ``\\w+``).

The simulator's KV events carry these ids, so with this tokenizer ``BlockKeys`` keys a
``/v1/completions`` prompt exactly as the events key the simulator's blocks.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

__all__ = ["LlmdSimTokenizer", "fnv1a_32"]

_PIECE = re.compile(r"""([{}:,\-.?!;@#$%^&*()+_~/\\><\[\]="']|[0-9A-Za-z_]+)[\t\n\f\r ]*""")
_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193
_MEMO_MAX = 65_536


def fnv1a_32(data: bytes) -> int:
    """The 32-bit FNV-1a hash (Go's ``hash/fnv.New32a``)."""
    h = _FNV32_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


class LlmdSimTokenizer:
    """llm-d-inference-sim's dummy tokenizer (module docstring); pieces are memoised (bounded)."""

    name = "llmd-sim"

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def chat_text(self, messages: Sequence[tuple[str, str]]) -> str:
        """The simulator's chat rendering: ``### <role>: <content>\\n`` per message
        (``pkg/api/response.go``; multi-part content is joined as epp reads it, without separators)."""
        return "".join(f"### {role}: {text}\n" for role, text in messages)

    def pieces(self, text: str) -> list[str]:
        """The text's tokens as strings, as the simulator's ``splitIntoTokens(text, -1)``."""
        return [m.group(0) for m in _PIECE.finditer(text)]

    def token_ids(self, text: str, limit: int | None = None) -> Sequence[int]:
        """The text's token ids; at most ``limit`` (the rest of a long prompt is never scanned)."""
        ids = self._ids
        out = []
        for m in itertools.islice(_PIECE.finditer(text), limit):
            piece = m.group(0)
            t = ids.get(piece)
            if t is None:
                if len(ids) >= _MEMO_MAX:
                    ids.clear()
                t = ids[piece] = fnv1a_32(piece.encode())
            out.append(t)
        return out
