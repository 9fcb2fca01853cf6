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
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson
import xxhash

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


class TokensPending(LookupError):
    """The server's token ids for this text are not known (not fetched, or the fetch failed)."""


@dataclass(eq=False, slots=True)
class TokenizeNeed:
    """One ``/tokenize`` call a request needs before its decision."""

    tokenizer: ServerTokenizer
    key: int
    model: str
    source: Mapping[str, object]  # InferenceRequest.prompt_source: a chat's fields, or {"prompt": text}

    @property
    def url(self) -> str:
        """Where to ask ("" = a model server of the pool)."""
        return self.tokenizer.url

    @property
    def timeout(self) -> float:
        return self.tokenizer.timeout

    def body(self) -> dict[str, object]:
        """vLLM's request (``TokenizeChatRequest`` or ``TokenizeCompletionRequest``): the fields
        that shape the prompt, as the client sent them.  Absent ones take the server's defaults,
        which its tokenize, chat and completion endpoints share (special tokens for a prompt;
        for a chat none, and the generation prompt), so the ids are the ones its blocks hold."""
        return {"model": self.model, **self.source}

    def deliver(self, token_ids: Sequence[int]) -> None:
        self.tokenizer.put(self.key, token_ids)


class ServerTokenizer:
    """The model server's token ids for a request, fetched before the decision (module
    docstring), kept in a bounded LRU: at most ``cache_size`` prompts and ``cache_ids`` ids in
    all, each entry cut at ``max_ids`` (the keys never read further).

    Keyed by a 128-bit digest of the target model and the request's ``prompt_source`` (its
    canonical JSON), so equal requests share an entry and no request can write under
    another's.  A prompt sent as token ids needs no call: its ids are the source.
    """

    name = "vllm-tokenize"

    def __init__(
        self,
        *,
        url: str = "",
        timeout: float = 0.05,
        cache_size: int = 1024,
        cache_ids: int = 4 << 20,
        max_ids: int = 1 << 16,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.cache_size = cache_size
        self.cache_ids = cache_ids
        self.max_ids = max_ids
        self._ids: OrderedDict[int, array[int]] = OrderedDict()
        self._held = 0  # ids held over all entries
        self._memo: tuple[object, str, int] | None = None  # (source, model, key) of the last request

    def _key(self, source: Mapping[str, object], model: str) -> int:
        memo = self._memo
        if memo is not None and memo[0] is source and memo[1] == model:
            return memo[2]
        canonical = orjson.dumps(source, option=orjson.OPT_SORT_KEYS)
        key = xxhash.xxh3_128_intdigest(canonical, seed=xxhash.xxh3_64_intdigest(model.encode()))
        self._memo = (source, model, key)
        return key

    def need(self, request: InferenceRequest) -> TokenizeNeed | None:
        """The call this request needs, or None (a batch, a prompt of token ids, or ids known)."""
        source = request.prompt_source
        if source is None or "token_ids" in source:
            return None
        key = self._key(source, request.target_model)
        if key in self._ids:
            self._ids.move_to_end(key)
            return None
        return TokenizeNeed(self, key, request.target_model, source)

    def ids_for(self, request: InferenceRequest) -> Sequence[int] | None:
        """The request's token ids (at most ``max_ids``), or None when they are not known."""
        source = request.prompt_source
        if source is None:
            return None
        given = source.get("token_ids")
        if isinstance(given, list):
            return given[: self.max_ids]
        return self._ids.get(self._key(source, request.target_model))

    def put(self, key: int, token_ids: Sequence[int]) -> None:
        ids = array("I", token_ids[: self.max_ids])
        old = self._ids.pop(key, None)
        if old is not None:
            self._held -= len(old)
        self._ids[key] = ids
        self._held += len(ids)
        while len(self._ids) > self.cache_size or (self._held > self.cache_ids and len(self._ids) > 1):
            self._held -= len(self._ids.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def held_ids(self) -> int:
        return self._held

    def token_ids(self, text: str, limit: int | None = None) -> Sequence[int]:
        """(The ``Tokenizer`` protocol.)  Ids are per request, not per text: see :meth:`ids_for`."""
        raise TokensPending("a server tokenizer's ids are read per request (ids_for)")
