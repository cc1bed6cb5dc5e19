"""Deterministic tokens and text: the stand-in's "model".

Nothing here is a language model. Prompts are split into word-like tokens
whose ids are stable hashes; the completion is drawn from a fixed vocabulary
with a random generator seeded from the prompt's token ids and the seed, so
the same prompt and seed always give the same text on every engine, whether
it prefilled locally or pulled the KV blocks from a producer. All functions
are pure.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BLOCK_SIZE",
    "MEDIA_TOKENS",
    "Completion",
    "complete",
    "kv_blocks",
    "media_token_ids",
    "text_token_ids",
]

#: Tokens per KV block, vLLM's default block size on GPUs.
BLOCK_SIZE = 16

#: Prompt tokens one image (or other media part) counts for. A guess at a
#: small image's share; it only shows in ``usage`` and metrics.
MEDIA_TOKENS = 64

#: Size of the made-up token id space.
VOCAB_SIZE = 151_936

#: Bounds of the length at which a completion stops by itself ("stop"),
#: chosen to make short test completions without a max_tokens.
NATURAL_LENGTH = (8, 40)

_TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")

_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu", "prefill", "decode", "token", "block", "cache",
    "engine",
)  # fmt: skip


@dataclass(frozen=True)
class Completion:
    """A planned completion.

    Attributes:
        tokens: Text pieces, one per generated token; joined they form the text.
        finish_reason: ``"length"`` when cut by ``max_tokens``, else ``"stop"``.
    """

    tokens: tuple[str, ...]
    finish_reason: str

    @property
    def text(self) -> str:
        """The whole completion text."""
        return "".join(self.tokens)


def text_token_ids(text: str) -> list[int]:
    """Token ids of ``text``: one per word or punctuation mark."""
    return [_stable_id(piece) for piece in _TOKEN_PATTERN.findall(text)]


def media_token_ids(reference: str) -> list[int]:
    """Token ids standing for one media part, derived from its URL only.

    The URL is hashed, never fetched: two prompts with the same image URL
    get the same tokens.
    """
    return [_stable_id(f"{reference}\0{i}") for i in range(MEDIA_TOKENS)]


def complete(
    prompt: Sequence[int],
    seed: int,
    max_tokens: int,
    min_tokens: int = 0,
    ignore_eos: bool = False,
) -> Completion:
    """Plan the completion of ``prompt``.

    Args:
        prompt: Prompt token ids.
        seed: Sampling seed (the request's, else the engine's ``--seed``).
        max_tokens: Most tokens to generate; at least 1.
        min_tokens: Fewest tokens before a natural stop may happen.
        ignore_eos: Never stop naturally: always generate ``max_tokens``.

    Returns:
        The tokens and why generation stopped.
    """
    rng = random.Random(_digest(seed, prompt))
    natural = rng.randint(*NATURAL_LENGTH)
    wanted = max_tokens if ignore_eos else max(natural, min_tokens)
    finish_reason = "length" if wanted >= max_tokens else "stop"
    words = [rng.choice(_WORDS) for _ in range(min(wanted, max_tokens))]
    tokens = [word if i == 0 else f" {word}" for i, word in enumerate(words)]
    return Completion(tokens=tuple(tokens), finish_reason=finish_reason)


def kv_blocks(prompt: Sequence[int]) -> list[str]:
    """The prompt's "KV cache": one digest per block of ``BLOCK_SIZE`` tokens.

    Each digest covers its block and every block before it, like the chained
    block hashes of vLLM's prefix cache, so a mismatch anywhere in the prompt
    changes every later block. A partial last block is included.
    """
    blocks: list[str] = []
    previous = ""
    for start in range(0, max(len(prompt), 1), BLOCK_SIZE):
        chunk = ",".join(str(t) for t in prompt[start : start + BLOCK_SIZE])
        previous = hashlib.blake2b(
            f"{previous}|{chunk}".encode(), digest_size=8
        ).hexdigest()
        blocks.append(previous)
    return blocks


def _stable_id(piece: str) -> int:
    # hashlib, not hash(): str hashes are salted per process, and P and D
    # must agree on token ids.
    digest = hashlib.blake2b(piece.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % VOCAB_SIZE


def _digest(seed: int, prompt: Sequence[int]) -> int:
    text = f"{seed}:" + ",".join(str(t) for t in prompt)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
