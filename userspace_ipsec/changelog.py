"""What changed in the SAD or SPD since a reader last looked.

The datapath keeps derived state (SA contexts, the inbound SPI index, routes, NAT keepalive
peers). Rescanning the whole database after each PF_KEY message costs O(N) per change, O(N^2)
to install N tunnels; reading the objects touched since its cursor costs O(changes). The log is
bounded: a reader that fell further behind than the bound, or that looks after a flush, gets
None and rescans, which is always correct.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_LIMIT = 1 << 16


class ChangeLog(Generic[T]):
    __slots__ = ("limit", "_items", "_base")

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._items: list[T] = []
        self._base = 0  # the cursor of _items[0]

    @property
    def cursor(self) -> int:
        """Where a reader that has seen everything so far stands."""
        return self._base + len(self._items)

    def record(self, item: T) -> None:
        """``item`` was added, removed or changed in place."""
        items = self._items
        items.append(item)
        if len(items) > self.limit:  # forget the older half: their readers rescan
            drop = len(items) // 2
            del items[:drop]
            self._base += drop

    def reset(self) -> None:
        """Everything changed at once (a flush): every reader rescans."""
        self._base = self.cursor + 1
        self._items.clear()

    def since(self, cursor: int) -> list[T] | None:
        """The items touched since ``cursor``, oldest first and possibly repeated; None when
        they are no longer known (the reader must rescan)."""
        if cursor < self._base:
            return None
        return self._items[cursor - self._base:]
