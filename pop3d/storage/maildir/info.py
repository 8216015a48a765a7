"""A compact MessageInfo for unread Maildir mail: every idle session keeps its snapshot for its whole life.

A message delivered to new/ is named by its uid alone, so its key is "new/" + uid: kept as a second string,
that is about 80 octets per message of every held session (of ~2.4 KiB for ten messages). `NewInfo` keeps
the uid only and makes the key when a file is opened, renamed or recorded, which is rare next to holding it.
"""

from __future__ import annotations

from typing import Any

from pop3d.storage.base import MessageInfo

_KEY: Any = MessageInfo.__dict__["key"]  # the slot MessageInfo keeps its key in


class NewInfo(MessageInfo):
    """A MessageInfo whose stored key is "" while it is "new/" + uid (any other key set later is kept)."""

    __slots__ = ()

    @property
    def key(self) -> str:
        own: str = _KEY.__get__(self)
        return own if own else "new/" + self.uid

    @key.setter
    def key(self, value: str) -> None:
        _KEY.__set__(self, value)  # "" (as compact() makes it): "new/" + uid

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageInfo):
            return NotImplemented
        return (self.size, self.uid, self.key) == (other.size, other.uid, other.key)

    __hash__ = None  # type: ignore[assignment]  # mutable, like MessageInfo


def infos(sizes: list[int], uids: list[str], keys: list[str]) -> list[MessageInfo]:
    """The snapshot of these messages, each still in new/ under its own uid a NewInfo."""
    new, plain = NewInfo, MessageInfo
    return [
        new(s, u, "") if k.startswith("new/") and k.endswith(u) and len(k) == len(u) + 4 else plain(s, u, k)
        for s, u, k in zip(sizes, uids, keys, strict=True)
    ]


def compact(messages: list[MessageInfo]) -> list[MessageInfo]:
    """`messages` as `infos` would have made them."""
    return infos([m.size for m in messages], [m.uid for m in messages], [m.key for m in messages])
