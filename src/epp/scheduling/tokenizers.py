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

``ServerTokenizer`` (``tokenizer: vllm-tokenize``) is the model server's own tokenizer, asked
over HTTP (vLLM's ``POST /tokenize``) before the decision: it works with any model and chat
template the server has, at the cost of one round trip per new prompt.  Scheduling stays
synchronous: this class only holds answers; the transport fetches what :meth:`ServerTokenizer.need`
names (``epp.datalayer.tokenize``, wired by the app) and delivers it before routing.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.domain import InferenceRequest

__all__ = ["LlmdSimTokenizer", "ServerTokenizer", "TokenizeNeed", "TokensPending", "fnv1a_32"]

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


_CHAT_KEY = "\0chat\0"  # starts every chat's cache key


class TokensPending(LookupError):
    """The server's token ids for this text are not known (not fetched, or the fetch failed)."""


@dataclass(eq=False, slots=True)
class TokenizeNeed:
    """One ``/tokenize`` call a request needs before its decision: ``prompt`` (a completion) or
    ``messages`` (a chat, which the server renders through its own chat template)."""

    tokenizer: ServerTokenizer
    key: str
    model: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = field(default=())

    @property
    def url(self) -> str:
        """Where to ask ("" = a model server of the pool)."""
        return self.tokenizer.url

    @property
    def timeout(self) -> float:
        return self.tokenizer.timeout

    def body(self) -> dict[str, object]:
        """vLLM's request: ``TokenizeCompletionRequest`` or ``TokenizeChatRequest``, with the
        defaults its completion and chat endpoints use (special tokens for a prompt; for a chat,
        none and the generation prompt), so the ids are the ones the server's blocks hold."""
        if self.messages:
            return {
                "model": self.model,
                "messages": [{"role": role, "content": text} for role, text in self.messages],
                "add_generation_prompt": True,
                "add_special_tokens": False,
            }
        return {"model": self.model, "prompt": self.prompt, "add_special_tokens": True}

    def deliver(self, token_ids: Sequence[int]) -> None:
        self.tokenizer.put(self.key, token_ids)


class ServerTokenizer:
    """The model server's token ids, fetched before a decision (module docstring) and kept in a
    bounded LRU (``cache_size`` texts) so a repeated prompt is asked once.

    ``token_ids`` of a text it was not given raises :class:`TokensPending`; the precise scorer
    then scores on the approximate index for that request.  One tokenizer per pool: the ids do
    not depend on which server (or adapter) produced them.
    """

    name = "vllm-tokenize"

    def __init__(self, *, url: str = "", timeout: float = 0.05, cache_size: int = 1024) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.cache_size = cache_size
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def chat_text(self, messages: Sequence[tuple[str, str]]) -> str:
        """A chat's key: its messages (the server renders them; epp never sees the rendering)."""
        return _CHAT_KEY + "".join(f"{role}\0{text}\0" for role, text in messages)

    def need(self, request: InferenceRequest) -> TokenizeNeed | None:
        """The call this request needs, or None (no prompt, or its ids are known).  A completion
        whose prompt looks like a chat's key is never asked for (so never cached): a client
        cannot put ids under another request's key."""
        if request.messages:
            key = self.chat_text(request.messages)
        elif request.prompt and not request.prompt.startswith(_CHAT_KEY):
            key = request.prompt
        else:
            return None
        if key in self._ids:
            self._ids.move_to_end(key)
            return None
        return TokenizeNeed(self, key, request.target_model, request.prompt, request.messages)

    def put(self, key: str, token_ids: Sequence[int]) -> None:
        self._ids[key] = tuple(token_ids)
        self._ids.move_to_end(key)
        while len(self._ids) > self.cache_size:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)

    def token_ids(self, text: str, limit: int | None = None) -> Sequence[int]:
        ids = self._ids.get(text)
        if ids is None:
            raise TokensPending(text[:64])
        return ids if limit is None else ids[:limit]
