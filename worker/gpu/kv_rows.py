"""The model's forward pass, one job's prefill and a running batch's KV cache whose rows join and
leave between decode steps.

Why rows can come and go without changing anyone's tokens: a row's keys and values depend only on
its own tokens and their positions. A joining job is prefilled alone (positions 0..n-1, as a solo
``generate`` gives them), then its cache rows are put under the batch's with left padding: the
shorter side gets zero keys and values on the left and zeros in the attention mask, so no row ever
attends to another's padding. Each decode step feeds every row its last token at that row's own
position id. A row that leaves is dropped from the cache, and columns that only padding still
fills are cut off the left. In fp32 every row's greedy tokens are then its solo tokens.

transformers' ``DynamicCache`` layers grow by concatenation, never in place, which is what lets a
cached prefix's tensors be shared with the prefill that made them (see worker.gpu.prefix_cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.gpu.model import EncodedPrompt, LoadedModel, device_pixels
from worker.gpu.prefix_cache import PrefixCache, visual_prefix_length

Forward = Callable[..., Any]


def model_forward(loaded: LoadedModel) -> Forward:
    """``loaded.model`` called with the cache under the name this transformers version takes
    (``past_key_values`` before 5.24, ``cache`` since)."""
    model = loaded.model
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(*, cache: Any, **inputs: Any) -> Any:
        return model(**inputs, **{name: cache}, use_cache=True, logits_to_keep=1)

    return forward


def empty_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def cache_from_layers(layers: list[tuple[Any, Any]]) -> Any:
    """A new cache holding copies of ``layers`` (``update`` concatenates onto an empty layer,
    which copies), so nothing done to it reaches the originals."""
    cache = empty_cache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def pixel_input(loaded: LoadedModel, encoded: EncodedPrompt) -> Any:
    """The prompt's pixel values on the model's device, in its dtype; None without images. Uint8
    frames are normalised there (``EncodedPrompt.pixels``), as the static batch does."""
    return device_pixels(loaded, encoded)


@dataclass
class Prefilled:
    cache: Any  # a DynamicCache of one row, without padding
    logits: Any  # [1, vocab]: the scores of the first new token
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the prefix cache


def prefill(
    loaded: LoadedModel, encoded: EncodedPrompt, forward: Forward, prefixes: PrefixCache | None = None
) -> Prefilled:
    """One job's prompt through the model alone. With ``prefixes``, a prompt with images is
    prefilled in two parts, its visual prefix (looked up first, kept afterwards) and the rest, so
    that a hit and a miss run exactly the same suffix computation."""
    import torch

    device = loaded.model.device
    ids = encoded.input_ids
    split = 0
    if prefixes is not None and prefixes.enabled and encoded.pixel_digest:
        split = visual_prefix_length(ids, loaded.image_token_id)
        if split >= len(ids):
            split = 0  # nothing after the images: no suffix to prefill on its own
    cached = 0
    if split:
        assert prefixes is not None
        entry = prefixes.get(ids[:split], encoded.pixel_digest)
        if entry is not None:
            cache = cache_from_layers(entry.layers)
            cached = split
        else:
            cache = empty_cache()
            forward(
                input_ids=torch.tensor([ids[:split]], device=device),
                attention_mask=torch.ones(1, split, dtype=torch.long, device=device),
                pixel_values=pixel_input(loaded, encoded),
                cache=cache,
            )
            # The next forward concatenates onto these tensors (new ones), so they stay as they are.
            prefixes.put(ids[:split], encoded.pixel_digest, cache_layers(cache))
        output = forward(
            input_ids=torch.tensor([ids[split:]], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            position_ids=torch.arange(split, len(ids), device=device).unsqueeze(0),
            cache=cache,
        )
    else:
        cache = empty_cache()
        inputs: dict[str, Any] = {
            "input_ids": torch.tensor([ids], device=device),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        }
        pixels = pixel_input(loaded, encoded)
        if pixels is not None:
            inputs["pixel_values"] = pixels
        output = forward(**inputs, cache=cache)
    return Prefilled(cache=cache, logits=output.logits[:, -1, :], prompt_tokens=len(ids), cached_tokens=cached)


class RunningRows:
    """The KV cache and attention mask of the rows generating now, in row order."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.cache: Any = None
        self.mask: Any = None  # [rows, length]: 1 where a row has a token, 0 for its left padding

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def join(self, prefilled: Prefilled) -> None:
        """Add ``prefilled``'s row below the others, left-padding whichever side is shorter. After
        a failure (out of memory) the running rows are as they were."""
        import torch
        from torch.nn.functional import pad

        theirs = prefilled.cache
        their_length = theirs.get_seq_length()
        their_mask = torch.ones(1, their_length, dtype=torch.long, device=prefilled.logits.device)
        if self.cache is None:
            self.cache, self.mask = theirs, their_mask
            return
        rows, length = self.rows, max(self.length, their_length)
        mine_pad, their_pad = length - self.length, length - their_length
        mask = torch.cat([pad(self.mask, (mine_pad, 0)), pad(their_mask, (their_pad, 0))])
        merged = 0
        try:
            # Layer by layer, so that the memory a merge needs beyond the cache is one layer's.
            for mine, other in zip(self.cache.layers, theirs.layers, strict=True):
                keys = torch.cat([pad(mine.keys, (0, 0, mine_pad, 0)), pad(other.keys, (0, 0, their_pad, 0))])
                values = torch.cat([pad(mine.values, (0, 0, mine_pad, 0)), pad(other.values, (0, 0, their_pad, 0))])
                mine.keys, mine.values = keys, values
                merged += 1
        except BaseException:
            for layer in self.cache.layers[:merged]:  # back to the running rows, as views
                layer.keys = layer.keys[:rows, :, mine_pad:]
                layer.values = layer.values[:rows, :, mine_pad:]
            raise
        self.mask = mask

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); cut the columns that are padding in every row left."""
        import torch

        if not rows:
            self.cache = self.mask = None
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # first column some row still uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def step(self, last_tokens: list[int], positions: list[int]) -> Any:
        """One decode step: each row's last token at its own position; returns [rows, vocab]
        scores. After a failure (out of memory) the cache is as it was before the step."""
        import torch

        device = self.mask.device
        length = self.length
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=self.mask.dtype, device=device)], dim=1)
        try:
            output = self.forward(
                input_ids=torch.tensor(last_tokens, device=device).unsqueeze(1),
                attention_mask=mask,
                position_ids=torch.tensor(positions, device=device).unsqueeze(1),
                cache=self.cache,
            )
        except BaseException:
            # Layers the failed step already grew are cut back, so the rows can go on or be split.
            for layer in self.cache.layers:
                if layer.keys is not None and layer.keys.shape[-2] > length:
                    layer.keys = layer.keys[:, :, :length]
                    layer.values = layer.values[:, :, :length]
            raise
        self.mask = mask
        return output.logits[:, -1, :]
