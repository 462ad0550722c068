"""One static KV cache whose batch rows are slots: each running answer owns one row.

`SlotCache` stands in for a transformers `Cache` in the language model's forward (the model
only calls `update(keys, values, layer_idx)`), with two ways to write:

- `prefill(row, start)`: one request's prompt chunk (batch 1) goes into its row at positions
  `start ..`, and attention reads that row up to the chunk's end.
- `decode(rows, positions, kv_len)`: one new token for each of rows `0 .. rows-1`, each at
  its own position (rows differ in length), and attention reads the first `kv_len` positions
  of those rows; the caller's mask hides what lies past each row's own length.

The tensors are allocated once, for the engine's life, at fixed addresses, so a compiled
decode step (and, on CUDA, its recorded graphs) never sees a new shape or address.
"""

from __future__ import annotations

from typing import Any

import torch


def _text_dims(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the text decoder."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def slot_cache_bytes(config: Any, rows: int, length: int, dtype: torch.dtype) -> int:
    """Memory a `SlotCache` of `rows` x `length` positions takes (keys and values)."""
    layers, kv_heads, head_dim = _text_dims(config)
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * rows * kv_heads * length * head_dim * item


class SlotCache:
    def __init__(
        self, config: Any, rows: int, length: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        layers, kv_heads, head_dim = _text_dims(config)
        self.rows = rows
        self.length = length
        shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        for tensor in (*self.keys, *self.values):
            # Fixed addresses: the compiled step and CUDA graphs update them in place.
            torch._dynamo.mark_static_address(tensor)
        self._row = 0
        self._start = 0
        self._decode_rows = 0
        self._positions: torch.Tensor | None = None
        self._kv_len = length

    # The transformers Cache interface the decoder layers use.
    is_compileable = True

    def prefill(self, row: int, start: int) -> SlotCache:
        """Set up the next forward as a prompt chunk of row `row` starting at `start`."""
        self._positions = None
        self._row, self._start = row, start
        return self

    def decode(self, rows: int, positions: torch.Tensor, kv_len: int) -> SlotCache:
        """Set up the next forward as one token for rows `0 .. rows-1` at `positions`."""
        self._decode_rows, self._positions, self._kv_len = rows, positions, kv_len
        return self

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._positions is None:
            row, start = self._row, self._start
            end = start + key_states.shape[-2]
            keys[row, :, start:end] = key_states[0]
            values[row, :, start:end] = value_states[0]
            return keys[row : row + 1, :, :end], values[row : row + 1, :, :end]
        rows = self._decode_rows
        index = torch.arange(rows, device=keys.device)
        # Advanced indices on dims 0 and 2 around a slice: the target is (rows, heads, dim).
        keys[index, :, self._positions] = key_states[:, :, 0]
        values[index, :, self._positions] = value_states[:, :, 0]
        return keys[:rows, :, : self._kv_len], values[:rows, :, : self._kv_len]

    # What transformers' mask builder asks a cache (prompt chunks only: a decode step passes
    # its own mask, one row per slot).
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._start

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._start + query_length, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly
