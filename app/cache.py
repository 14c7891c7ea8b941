"""The app's one cache: a small thread-safe LRU keyed by whatever identifies a computed value.

    projections = LRU(64)
    out = projections.get_or_make((run, layer, method), lambda: expensive(...))

Traces, packed models, projections, images and image metrics all use it (each with its own size).
Values are computed outside the lock (two threads may compute the same key once; the first stored wins).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable


class LRU:
    def __init__(self, size: int):
        self.size = int(size)
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value):
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], object]):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return self.put(key, make())

    def clear(self):
        with self._lock:
            self._data.clear()

    def drop(self, match: Callable[[Hashable], bool]):
        """Forget every entry whose key matches (e.g. a run that was rewritten)."""
        with self._lock:
            for k in [k for k in self._data if match(k)]:
                del self._data[k]
