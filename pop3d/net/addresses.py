"""Does a peer address lie in a configured list of networks? One answer for every caller.

Used for `auth.secure_networks` (cleartext logins without TLS) and `server.proxy_trusted` (who may send a
PROXY header). The peer is the string asyncio reports: an IPv4 or IPv6 address, possibly an IPv4-mapped
IPv6 address from a dual-stack listener, possibly with a `%scope` suffix, or the path of a UNIX socket.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Networks:
    """A parsed, immutable list of networks; `address in networks` matches a peer address string."""

    __slots__ = ("_answers", "_nets")

    #: answers remembered per list: parsing an address costs more than the rest of admitting a connection,
    #: and clients come back. Bounded (a client with a whole IPv6 /64 cannot grow it): emptied when full.
    MEMO = 4096

    def __init__(self, cidrs: Iterable[str]) -> None:
        """ValueError for an entry that is neither an address nor a CIDR network (config validates first)."""
        self._nets: tuple[Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._answers: dict[str, bool] = {}

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        answer = self._answers.get(address)
        if answer is None:
            if len(self._answers) >= self.MEMO:
                self._answers.clear()
            answer = self._answers[address] = self._match(address)
        return answer

    def _match(self, address: str) -> bool:
        ip = parse_peer(address)
        if ip is None:
            return False
        # an IPv4-mapped peer (::ffff:a.b.c.d) is the IPv4 client; a network written in mapped form matches too
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return any(ip in net or (mapped is not None and mapped in net) for net in self._nets)

    def __len__(self) -> int:
        return len(self._nets)

    def __repr__(self) -> str:
        return f"Networks({[str(n) for n in self._nets]!r})"


def parse_peer(address: str) -> Address | None:
    """The IP address in a peer string, without its scope id; None for a UNIX-socket path or garbage."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None


@functools.lru_cache(maxsize=16)
def _parsed(cidrs: tuple[str, ...]) -> Networks:
    return Networks(cidrs)


def networks(cidrs: Iterable[str]) -> Networks:
    """`Networks` for a configured list, parsed once per distinct list (a reload brings a new one)."""
    return _parsed(tuple(cidrs))


def in_networks(address: str, cidrs: Iterable[str]) -> bool:
    """True when the peer `address` lies in one of `cidrs`; a UNIX-socket peer never does."""
    return address in networks(cidrs)
