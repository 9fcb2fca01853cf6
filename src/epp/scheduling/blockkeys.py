"""Block keys: how epp names a prompt's KV-cache blocks so they match what pods report.

A pod's KV events (vLLM's ``BlockStored``) name blocks by the *engine's* hash (vLLM:
SHA-256 of pickled or CBOR tuples with a per-process seed; epp-sim: xxh3).  epp never
reproduces that hash.  Like llm-d's KV-cache indexer it computes its own *key* for each
block from the block's token ids, the same way on both sides:

* from an event: the subscriber (``epp.datalayer.kvevents``) chains keys over the
  ``token_ids`` the event carries, starting from the key of its ``parent_block_hash``
  (remembered from an earlier event) or from the root;
* from a request: the scorer tokenizes the prompt and chains keys over its full blocks.

The scheme, exactly::

    root(model)  = xxh3_64(utf8(hash_seed + "\\0" + model))          # model: LoRA name, else the base model
    key_0        = xxh3_64(pack("<16I", tokens[0:16]),  seed=root(model))   # block size 16
    key_k        = xxh3_64(pack("<16I", tokens[16k:16k+16]), seed=key_{k-1})

(``<I``: each token id as 4 bytes, little-endian.)  Only full blocks have keys, as only
full blocks are cached.  ``model`` is the event's ``lora_name`` or else the model named in
its topic (``kv@<pod>@<model>``); on the request side, ``InferenceRequest.target_model``.

epp has no model tokenizer, so the scheme's ``Tokenizer`` is pluggable:

* ``Utf8QuadTokenizer`` (``tokenizer: utf8-quad``, the default): epp-sim's tokenizer,
  token ``i`` = UTF-8 bytes ``[4i, 4i+4)`` as a little-endian uint32.  Its packed tokens are
  the text's bytes, so keys cost one xxh3 per block and no token list is built.
* ``ServerTokenizer`` (``tokenizer: vllm-tokenize``): the ids the model server's own
  ``/tokenize`` returns for the request, fetched before the decision and keyed here with
  :meth:`BlockKeys.id_keys`; it makes the same scheme match a real vLLM (any model, its chat
  template), whose events carry the real token ids;
* anything else with ``token_ids(text) -> Sequence[int]`` (an in-process Hugging Face
  tokenizer, say).  A tokenizer that cannot answer now raises ``TokensPending``: the
  scorer then uses the approximate index for that request, as it does when a server
  tokenizer's ids did not come.

Invariants: equal (tokens, block size, model, seed) give equal keys in every process;
a prompt that extends another shares its leading keys; keys are 64-bit unsigned ints.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import xxhash

from epp.scheduling.tokenizers import LlmdSimTokenizer, ServerTokenizer

__all__ = ["TOKENIZERS", "BlockKeys", "BlockLookup", "ChatTemplate", "Tokenizer", "Utf8QuadTokenizer"]

_BYTES_PER_TOKEN = 4


class Tokenizer(Protocol):
    """Text → the model's token ids (the ones its KV events carry).  A tokenizer whose
    ``token_ids`` also takes a ``limit`` keyword is asked for at most that many (only a
    prompt's first ``max_blocks`` blocks are keyed: the rest need not be tokenized)."""

    name: str

    def token_ids(self, text: str) -> Sequence[int]: ...


@runtime_checkable
class ChatTemplate(Protocol):
    """A tokenizer that also knows the server's chat template: the text a chat request becomes."""

    def chat_text(self, messages: Sequence[tuple[str, str]]) -> str: ...


class Utf8QuadTokenizer:
    """epp-sim's tokenizer: one token per 4 UTF-8 bytes, the bytes read as a little-endian uint32;
    chat requests are rendered with epp-sim's template (``epp_sim.openai_api.render_chat``)."""

    name = "utf8-quad"

    def chat_text(self, messages: Sequence[tuple[str, str]]) -> str:
        return "".join(f"<|{role}|>\n{text}\n" for role, text in messages) + "<|assistant|>\n"

    def token_ids(self, text: str, limit: int | None = None) -> Sequence[int]:
        data = text.encode("utf-8", "surrogatepass")
        if limit is not None:
            data = data[: limit * _BYTES_PER_TOKEN]
        data += b"\0" * (-len(data) % _BYTES_PER_TOKEN)
        return struct.unpack(f"<{len(data) // _BYTES_PER_TOKEN}I", data)


# tokenizer parameter of precise-prefix-cache-scorer → a factory
TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "utf8-quad": Utf8QuadTokenizer,
    "llmd-sim": LlmdSimTokenizer,
    "vllm-tokenize": ServerTokenizer,  # the server's /tokenize (its parameters: profile._precise)
}


class BlockLookup(Protocol):
    """What the precise scorer reads from the KV-event index (``epp.datalayer.kvevents``)."""

    def block_size(self, address: str) -> int | None:
        """The pod's block size from its events; None while it has published nothing."""
        ...

    def leading_run(self, address: str, keys: Sequence[int]) -> int:
        """How many of ``keys``, from the first, the pod holds without a gap."""
        ...

    def speculate(self, address: str, keys: Sequence[int], ttl: float) -> bool:
        """epp just sent the pod a prompt with these keys: count them as held for ``ttl`` s."""
        ...


class BlockKeys:
    """The key scheme (module docstring): one per epp process, shared by subscriber and scorer."""

    def __init__(self, tokenizer: Tokenizer | None = None, *, hash_seed: str = "", max_blocks: int = 256) -> None:
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else Utf8QuadTokenizer()  # (one may be falsy)
        self.hash_seed = hash_seed
        self.max_blocks = max_blocks
        self._roots: dict[str, int] = {}
        self._quad = isinstance(self.tokenizer, Utf8QuadTokenizer)
        self._limited = "limit" in inspect.signature(self.tokenizer.token_ids).parameters

    def root(self, model: str) -> int:
        """The chain's start for ``model`` (the LoRA adapter's name, else the base model's)."""
        r = self._roots.get(model)
        if r is None:
            if len(self._roots) > 4096:  # model names come from events and requests: keep the memo bounded
                self._roots.clear()
            r = self._roots[model] = xxhash.xxh3_64_intdigest(f"{self.hash_seed}\0{model}".encode())
        return r

    def chain(self, parent: int, token_ids: Sequence[int], block_size: int) -> list[int]:
        """Keys of the full blocks of ``token_ids``, chained from ``parent`` (a key or a root)."""
        n = len(token_ids) // block_size
        if n == 0:
            return []
        data = struct.pack(f"<{n * block_size}I", *token_ids[: n * block_size])
        return self._chain_bytes(parent, data, n, block_size * _BYTES_PER_TOKEN)

    def id_keys(self, token_ids: Sequence[int], model: str, block_size: int) -> list[int]:
        """Keys of the leading full blocks of a prompt given as ids, at most ``max_blocks``."""
        n = min(len(token_ids) // block_size, self.max_blocks)
        if n == 0:
            return []
        data = struct.pack(f"<{n * block_size}I", *token_ids[: n * block_size])
        return self._chain_bytes(self.root(model), data, n, block_size * _BYTES_PER_TOKEN)

    def request_text(self, prompt: str, messages: Sequence[tuple[str, str]] = ()) -> str:
        """The text the server tokenizes: a chat request through the tokenizer's chat template
        (when it has one), anything else as epp parsed it."""
        if messages and isinstance(self.tokenizer, ChatTemplate):
            return self.tokenizer.chat_text(messages)
        return prompt

    def prompt_keys(self, text: str, model: str, block_size: int) -> list[int]:
        """Keys of the prompt's full leading blocks, at most ``max_blocks``."""
        span = block_size * _BYTES_PER_TOKEN
        if self._quad:
            data = text.encode("utf-8", "surrogatepass") if not text.isascii() else text.encode()
        else:
            tok: Any = self.tokenizer
            ids = tok.token_ids(text, limit=self.max_blocks * block_size) if self._limited else tok.token_ids(text)
            n = len(ids) // block_size
            data = struct.pack(f"<{n * block_size}I", *ids[: n * block_size])
        n = min(len(data) // span, self.max_blocks)
        return self._chain_bytes(self.root(model), data, n, span)

    @staticmethod
    def _chain_bytes(h: int, data: bytes, n: int, span: int) -> list[int]:
        digest = xxhash.xxh3_64_intdigest
        out = []
        view = memoryview(data)
        for i in range(n):
            h = digest(view[i * span : (i + 1) * span], seed=h)
            out.append(h)
        return out
