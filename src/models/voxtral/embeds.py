"""Audio encoder outputs kept per utterance, so a chat's earlier turns are encoded once.

A conversation sends its last turns' audio with every new turn (`Request.history`); running
the audio encoder over all of it again makes each turn slower than the one before. The
engine keeps each utterance's embeddings, keyed by the audio array's identity (the history
holds the very array that was answered), checked through a weak reference so a recycled
`id` never matches, dropped as soon as the array is freed, and bounded (least recently used
first). Thread-safe: the array may be freed on any thread.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch


class AudioEmbedCache:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[int, tuple[weakref.ref[np.ndarray], torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, audio: np.ndarray) -> torch.Tensor | None:
        with self._lock:
            item = self._items.get(id(audio))
            if item is None or item[0]() is not audio:
                self.misses += 1
                return None
            self._items.move_to_end(id(audio))
            self.hits += 1
            return item[1]

    def put(self, audio: np.ndarray, embeds: torch.Tensor) -> None:
        key = id(audio)

        def forget(ref: weakref.ref[np.ndarray]) -> None:
            with self._lock:
                item = self._items.get(key)
                if item is not None and item[0] is ref:
                    del self._items[key]

        with self._lock:
            self._items[key] = (weakref.ref(audio, forget), embeds)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
