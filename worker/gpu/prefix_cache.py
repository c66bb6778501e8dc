"""The KV cache of recently seen visual prefixes, kept on the device for the next question about
the same frames.

The prompt puts every frame before the question (the chat template does; a custom ``prompt`` may
put text first, which then belongs to the prefix), so two questions about the same frames share
their tokens up to the end of the last image's run. A job whose prompt starts with a cached prefix
skips the vision tower and the prefill of those tokens: it prefills only its own suffix against a
copy of the cached keys and values.

An entry is found by the model, the exact prefix token ids and a digest of the pixels of its
images: the same text over different frames (or the same frames sampled otherwise)
never hits. Entries are evicted least recently used first, to stay within a byte bound
(``VIDEOQA_PREFIX_CACHE_BYTES``); an entry larger than the bound is not kept.

The worker runs one batch at a time in one thread, so the cache takes no lock.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Without a setting: on CUDA this share of the memory left free once the model is loaded and
# warmed up (the rest is for the batch's own KV cache); on the CPU a fixed, small amount.
CUDA_SHARE = 0.2
CPU_BYTES = 256 * 2**20


def pixel_digest(images: list[Any]) -> str:
    """A digest of a prompt's images, in prompt order: the pixels its pixel values are made from
    (the model's processor, part of the key through the model, turns equal images into equal
    pixel values). Hashing the 8-bit images rather than the float tensor reads a quarter of the
    bytes: a few milliseconds per 12 frames."""
    digest = hashlib.blake2b(digest_size=16)
    for image in images:
        digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]};".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def visual_prefix_length(input_ids: list[int], image_token_id: int) -> int:
    """Tokens up to and including the last image token's run; 0 for a prompt without images."""
    for position in range(len(input_ids) - 1, -1, -1):
        if input_ids[position] == image_token_id:
            return position + 1
    return 0


@dataclass
class PrefixEntry:
    token_ids: tuple[int, ...]
    layers: list[tuple[Any, Any]]  # keys and values of each layer, [1, heads, prefix, head_dim]
    nbytes: int


class PrefixCache:
    """Least recently used prefix KV caches within ``max_bytes``; 0 keeps nothing."""

    def __init__(self, max_bytes: int, model_id: str = "") -> None:
        self.max_bytes = max_bytes
        self.model_id = model_id
        self.entries: OrderedDict[tuple[str, str], PrefixEntry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def key(self, token_ids: list[int] | tuple[int, ...], digest: str) -> tuple[str, str]:
        ids = hashlib.blake2b(digest_size=16)
        ids.update(",".join(map(str, token_ids)).encode())
        return (self.model_id, f"{ids.hexdigest()}:{digest}")

    def get(self, token_ids: list[int], digest: str) -> PrefixEntry | None:
        """The entry of exactly these prefix ids and pixels, now the most recently used."""
        key = self.key(token_ids, digest)
        entry = self.entries.get(key)
        if entry is None or entry.token_ids != tuple(token_ids):
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, token_ids: list[int], digest: str, layers: list[tuple[Any, Any]]) -> bool:
        """Keep ``layers`` (the caller does not change them afterwards); False when they alone
        exceed the bound."""
        nbytes = sum(keys.nbytes + values.nbytes for keys, values in layers)
        if not self.enabled or nbytes > self.max_bytes:
            return False
        key = self.key(token_ids, digest)
        if key in self.entries:
            self.bytes -= self.entries.pop(key).nbytes
        while self.entries and self.bytes + nbytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes
        self.entries[key] = PrefixEntry(tuple(token_ids), layers, nbytes)
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def default_prefix_cache_bytes(device: str, free_bytes: int) -> int:
    return int(CUDA_SHARE * free_bytes) if device.startswith("cuda") else CPU_BYTES
