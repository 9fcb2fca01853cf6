"""A deterministic, cheap stand-in for a tokenizer, plus generated text.

Owns how a prompt becomes a token count and a chain of prefix-cache block hashes, and what
text a generated token reads as.

- Text: one token per 4 UTF-8 bytes (rounded up, at least 1); block `k` of a
  `block_size`-token block covers bytes `[4*block_size*k, 4*block_size*(k+1))`. Only blocks
  whose bytes are all present are hashed (vLLM hashes full blocks only).
- Token ids (completions `prompt: [1, 2, 3]`): one token per id; blocks of `block_size` ids.
- Token ids (what KV events carry): token `i` of a text prompt is its bytes `[4i, 4i+4)` read
  as a little-endian uint32 (`block_token_ids`), so ids are a pure function of the text and
  a consumer packing them back as `<I` gets the text's bytes. Id prompts keep their ids.
- Hashes are chained as in vLLM: `h_k = xxh3_64(block_k, seed=h_{k-1})`; the chain starts at
  a hash of the extra keys (LoRA adapter name and `cache_salt`), so adapters and salts never
  share cache blocks.

Invariant: equal (text, block_size, adapter, salt) always give equal `Prompt`s, in every
process and run; a prompt that extends another shares its leading block hashes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

__all__ = [
    "BYTES_PER_TOKEN",
    "Prompt",
    "block_token_ids",
    "count_tokens",
    "generated_text",
    "text_token_ids",
    "tokenize",
    "tokenize_ids",
]

BYTES_PER_TOKEN = 4

# Generated tokens read as words from this list; each entry counts as one token.
_VOCAB = (
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was",
    " on", " be", " at", " by", " this", " had", " not", " are", " but", " from", " or", " have",
    " an", " they", " which", " one", " you", " were", " all", " we", " when", " your", " can",
    " said", " there", " use", " each", " she", " do", " how", " their", " if", " will", " up",
    " other", " about", " out", " many", " then", " them", " these", " so", " some", " her",
    " would", " make", " like", " him", " into", " time", " has", " look",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Prompt:
    """A tokenised prompt: its token count and the chained hashes of its full blocks."""

    num_tokens: int
    block_hashes: tuple[int, ...]
    # What the tokens are made of: the text's UTF-8 bytes, or the ids of an id prompt.
    source: bytes | tuple[int, ...] = field(default=(), compare=False, repr=False)


def block_token_ids(prompt: Prompt, k: int, block_size: int) -> tuple[int, ...]:
    """The token ids of full block `k` of `prompt` (see the module docstring)."""
    src = prompt.source
    if isinstance(src, bytes):
        return struct.unpack_from(f"<{block_size}I", src, k * block_size * BYTES_PER_TOKEN)
    return tuple(src[k * block_size : (k + 1) * block_size])


def _root(adapter: str | None, cache_salt: str | None) -> int:
    return xxhash.xxh3_64_intdigest(f"{adapter or ''}\x00{cache_salt or ''}".encode())


def count_tokens(text: str) -> int:
    """Token count of `text` (no hashing)."""
    return max(1, -(-len(text.encode()) // BYTES_PER_TOKEN))


def tokenize(text: str, block_size: int, adapter: str | None = None, cache_salt: str | None = None) -> Prompt:
    """Tokenise prompt text into a `Prompt`."""
    data = text.encode()
    span = block_size * BYTES_PER_TOKEN
    h = _root(adapter, cache_salt)
    hashes = []
    for start in range(0, len(data) - span + 1, span):
        h = xxhash.xxh3_64_intdigest(data[start : start + span], seed=h)
        hashes.append(h)
    return Prompt(max(1, -(-len(data) // BYTES_PER_TOKEN)), tuple(hashes), data)


def text_token_ids(text: str) -> list[int]:
    """The token ids of a text prompt (module docstring), the last token zero-padded: what
    `/tokenize` answers and, for full blocks, what KV events carry."""
    data = text.encode()
    data += b"\0" * (-len(data) % BYTES_PER_TOKEN)
    return list(struct.unpack(f"<{len(data) // BYTES_PER_TOKEN}I", data))


def tokenize_ids(
    ids: Sequence[int], block_size: int, adapter: str | None = None, cache_salt: str | None = None
) -> Prompt:
    """Tokenise a list of token ids into a `Prompt`."""
    h = _root(adapter, cache_salt)
    hashes = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        h = xxhash.xxh3_64_intdigest(repr(list(ids[start : start + block_size])).encode(), seed=h)
        hashes.append(h)
    return Prompt(max(1, len(ids)), tuple(hashes), tuple(ids))


def generated_text(seed: int, start: int, stop: int) -> str:
    """Text of generated tokens `[start, stop)` of a request whose text seed is `seed`."""
    n = len(_VOCAB)
    return "".join(_VOCAB[(seed + i * 7) % n] for i in range(start, stop))
