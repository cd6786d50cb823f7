"""KV caches filled under compression: the record that travels with the cache.

After a compressed prefill the layers of a KV cache hold different numbers of slots (a layer after an
LLM-side stage holds fewer; with encoder- or projector-site stages even layer 0 holds fewer than the
prompt's tokens). Decoding from such a cache needs to know, per layer, which slots may be attended (dead
padding slots may not), the proportional-attention bias of merged slots, and how far the positions of new
tokens move. That knowledge is written onto the cache itself, as a `CacheRecord`, so that

* a cache returned by ``model(..., use_cache=True)`` can be fed back step by step (hand-written decoding
  loops), and a copy made with ``copy.deepcopy`` (the prompt-reuse recipe of `transformers`) carries its
  own record and decodes independently of the original;
* several caches filled in one ``with`` block (several conversations) decode independently;
* `transformers` sees the *logical* length of the cache, the uncompressed length of everything it holds:
  ``generate()`` slices a continued prompt (multi-turn chat) and numbers positions by
  ``cache.get_seq_length()``, which must count the prompt as the user wrote it, not the slots kept;
* a cache continued after its ``with`` block ended fails with an error that says so, instead of being read
  by the plain model as an uncompressed cache (which would silently give wrong results).

This is done by giving the cache object a tokcomp subclass of its own class (`CompressedCache` mixed in
front, created once per cache class). No library class is changed; only cache objects that a compressed
prefill filled become compressed caches, and stay so (their content is compressed for good).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import RuntimeStateError

__all__ = ["CacheRecord", "CompressedCache", "LayerSlots", "attach", "new_run_id", "record_of", "stored_length"]

_LIVE: set[int] = set()
"""Ids of the `tokcomp.CompressionRun`s whose ``with`` block is open."""
_ids = itertools.count(1)


def new_run_id() -> int:
    """A fresh id for a `tokcomp.CompressionRun` (ints survive ``copy.deepcopy`` unchanged)."""
    return next(_ids)


def set_live(run_id: int, live: bool) -> None:
    """Mark a run's ``with`` block open (``live=True``) or closed."""
    if live:
        _LIVE.add(run_id)
    else:
        _LIVE.discard(run_id)


@dataclass
class LayerSlots:
    """What one layer's cache holds after prefill, for building its decode masks.

    Attributes:
        valid: ``(B, S)`` bool, the slots a new token may attend (False: dead padding slots and padding).
        bias: ``(B, S)`` float ``log size`` of merged slots (proportional attention), or None.
    """

    valid: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class CacheRecord:
    """The compression state of one KV cache (see the module docstring).

    Attributes:
        run_id: The `tokcomp.CompressionRun` that filled the cache.
        length: The prompt's uncompressed length (what the 2-D attention mask of the prefill covered).
        slots: Per decoder layer, the slots its cache received at prefill.
        layers: Per decoder layer whose slots differ from the prompt's, the slots' validity and bias.
        index: Per such layer, ``(B, S)`` the original position of every slot (-1: dead slot).
        decode_shift: ``(B,)`` added to the positions of every later token (encoder/projector stages
            renumber the prompt as if it were shorter), or None.
    """

    run_id: int
    length: int
    slots: list[int]
    layers: dict[int, LayerSlots] = field(default_factory=dict)
    index: dict[int, torch.Tensor] = field(default_factory=dict)
    decode_shift: torch.Tensor | None = None

    def _rows(self, fn: Any) -> None:
        for rec in self.layers.values():
            rec.valid = fn(rec.valid)
            rec.bias = None if rec.bias is None else fn(rec.bias)
        self.index = {k: fn(v) for k, v in self.index.items()}
        if self.decode_shift is not None:
            self.decode_shift = fn(self.decode_shift)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows`` (in that order), as the cache's own tensors do on a beam reorder."""
        self._rows(lambda t: t.index_select(0, rows.to(t.device)))

    def repeat_rows(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place, as the cache does."""
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))


def record_of(cache: Any) -> CacheRecord | None:
    """The record of a cache a compressed prefill filled, or None."""
    return getattr(cache, "_tokcomp_record", None) if isinstance(cache, CompressedCache) else None


def stored_length(cache: Any, layer: int = 0) -> int:
    """The number of slots ``layer`` of ``cache`` physically holds (not the logical length)."""
    if isinstance(cache, CompressedCache):
        return int(super(CompressedCache, cache).get_seq_length(layer))
    return int(cache.get_seq_length(layer))


class CompressedCache:
    """Mixed in front of a cache's class when a compressed prefill fills it (see the module docstring).

    ``get_seq_length`` reports the logical length: the slots held plus those the prefill removed, so that
    `transformers` slices continued prompts and numbers positions as for the uncompressed cache; mask
    sizes and query offsets stay physical, since the attention runs over the slots that are there.
    """

    _tokcomp_record: CacheRecord

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (logical length: the prompt counted uncompressed, plus every later token)."""
        held = super().get_seq_length(layer_idx)  # type: ignore[misc]
        if not held:
            return held
        rec = self._tokcomp_record
        return held + rec.length - rec.slots[layer_idx]

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Offset of new queries among the slots held (physical: the masks index the slots held)."""
        return super().get_seq_length(layer_idx)  # type: ignore[misc]

    def update(self, *args: Any, **kwargs: Any) -> Any:
        """Store new keys and values, if the ``with`` block that compressed this cache is still open."""
        rec = self._tokcomp_record
        if rec.run_id not in _LIVE:
            raise RuntimeStateError(
                "this KV cache was filled inside a tokcomp.compress block that has ended: its layers hold "
                f"different numbers of tokens ({', '.join(str(s) for s in rec.slots)} at prefill, for a prompt of "
                f"{rec.length}), which only that block knows how to attend to; the plain model would read it "
                "as an uncompressed cache and give wrong results. Continue the cache inside the same "
                "`with tokcomp.compress(...)` block (a copy.deepcopy of it works there too), or run the "
                "prompt again without compression"
            )
        return super().update(*args, **kwargs)  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch for beam search, the record's rows with it."""
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        self._tokcomp_record.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices``, the record's rows with them."""
        super().batch_select_indices(indices)  # type: ignore[misc]
        self._tokcomp_record.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row, the record's rows with it."""
        super().batch_repeat_interleave(repeats)  # type: ignore[misc]
        self._tokcomp_record.repeat_rows(repeats)


_classes: dict[type, type] = {}


def _compressed_class(base: type) -> type:
    if base not in _classes:
        _classes[base] = type(f"Compressed{base.__name__}", (CompressedCache, base), {"__module__": __name__})
    return _classes[base]


def attach(cache: Any, record: CacheRecord) -> None:
    """Make ``cache`` a compressed cache carrying ``record`` (its class gains the `CompressedCache` mixin)."""
    if not isinstance(cache, CompressedCache):
        cache.__class__ = _compressed_class(type(cache))
    cache._tokcomp_record = record
