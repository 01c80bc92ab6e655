"""A cache keyed by the identity of live objects (process groups, caller handles)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any


class IdentityCache:
    """Values keyed by a live object's identity (a group, a handle); an entry dies with its key.

    Keyed by ``id()`` with a weak reference beside it, so a recycled id never returns a stale
    value and nothing here keeps a process group alive.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, Any]] = {}
        self._lock = threading.RLock()  # setdefault holds it around get and put

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any) -> Any:
        with self._lock:
            hit = self._entries.get(id(key))
            return hit[1] if hit is not None and hit[0]() is key else None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            for k, (ref, _) in list(self._entries.items()):  # keys freed since (a new world)
                if ref() is None:
                    del self._entries[k]
            try:
                ref = weakref.ref(key)
            except TypeError:
                ref = lambda: key  # noqa: E731 - objects without weak references stay alive
            self._entries[id(key)] = (ref, value)

    def setdefault(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value for ``key``, made and stored by ``make()`` if absent: one per key, even
        when several threads ask at once."""
        with self._lock:
            value = self.get(key)
            if value is None:
                value = make()
                self.put(key, value)
            return value

    def values(self) -> list[Any]:
        with self._lock:
            return [value for ref, value in self._entries.values() if ref() is not None]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def drain(self) -> list[Any]:
        """Every value, those of keys freed since included, and forget them all."""
        with self._lock:
            values = [value for _, value in self._entries.values()]
            self._entries.clear()
            return values
