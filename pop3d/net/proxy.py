"""Sans-IO parser for the HAProxy PROXY protocol, versions 1 (text) and 2 (binary).

Facts from the HAProxy spec (doc/proxy-protocol.txt), by section:
- §2.1 v1: one line `PROXY TCP4|TCP6|UNKNOWN [src dst sport dport]\\r\\n`, at most 107 octets with the CRLF;
  single spaces, addresses in canonical form for their family, ports 0-65535 in decimal without sign.
  `UNKNOWN` means "use the connection's own addresses" (the proxy health-checking us, for instance).
- §2.2 v2: a 12-octet signature, a version/command octet (0x2 high nibble; command LOCAL 0x0 or PROXY 0x1),
  a family/transport octet, a 16-bit big-endian length, then the addresses (IPv4 12 octets, IPv6 36,
  unix 216) and optional TLVs, which we skip. LOCAL means "use the connection's own addresses".
- The header is the very first thing on the connection and comes before any server greeting (§1), so the
  session must not greet before the parser says `done`.

No sockets, no asyncio: feed bytes, get `None` (need more), a `ProxyHeader`, or a `ProxyError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # §2.1: worst case "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n"
V2_MAX_PAYLOAD: Final = 4096  # §2.2 allows 65535; no real proxy sends more than a few hundred octets of TLVs

_V2_FAMILIES: Final = {
    0x11: ("TCP4", 12),
    0x12: ("UDP4", 12),
    0x21: ("TCP6", 36),
    0x22: ("UDP6", 36),
    0x31: ("UNIX", 216),
    0x32: ("UNIX", 216),
    0x00: ("UNSPEC", 0),
}


class ProxyError(ValueError):
    """A malformed PROXY header: the connection must be closed without a reply."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy told us. `source` is None when the proxy says to use the socket's own addresses."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    rest: bytes  # octets after the header: the client's first bytes, to be fed to the POP3 session


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0:1] == b"0"):
        raise ProxyError(f"bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"port {port} out of range")
    return port


def _address(text: bytes, family: bytes) -> str:
    try:
        addr = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"bad address {text[:48]!r}") from None
    if (family == b"TCP4") != (addr.version == 4):
        raise ProxyError(f"address {addr} does not match {family.decode()}")
    return str(addr)


def _parse_v1(line: bytes) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """§2.1: `line` is the header without its CRLF."""
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        raise ProxyError("bad v1 header")
    family = parts[1]
    if family == b"UNKNOWN":
        return None, None  # the rest of the line is to be ignored (§2.1)
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"unknown v1 protocol {family[:8]!r}")
    if len(parts) != 6:
        raise ProxyError("v1 header needs 4 fields after the protocol")
    src, dst = _address(parts[2], family), _address(parts[3], family)
    return (src, _port(parts[4])), (dst, _port(parts[5]))


def _parse_v2(ver_cmd: int, fam: int, payload: bytes) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
    """§2.2: addresses of a v2 header; LOCAL and non-IP families keep the socket's addresses."""
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"unsupported v2 version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyError(f"unknown v2 command {command}")
    known = _V2_FAMILIES.get(fam)
    if known is None:
        raise ProxyError(f"unknown v2 family 0x{fam:02x}")
    name, need = known
    if len(payload) < need:
        raise ProxyError(f"v2 {name} payload too short ({len(payload)} < {need})")
    if command == 0 or name in ("UNSPEC", "UNIX"):
        return None, None  # LOCAL (health check by the proxy) or an address we cannot use
    if name.endswith("4"):
        s, d, sp, dp = struct.unpack_from("!4s4sHH", payload)
        return (str(ipaddress.IPv4Address(s)), sp), (str(ipaddress.IPv4Address(d)), dp)
    s, d, sp, dp = struct.unpack_from("!16s16sHH", payload)
    return (str(ipaddress.IPv6Address(s)), sp), (str(ipaddress.IPv6Address(d)), dp)


class ProxyParser:
    """Accumulates the first octets of a connection until a complete PROXY header is in."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add octets; returns the header once complete, None while more are needed; raises ProxyError."""
        buf = self._buf = self._buf + data
        n = len(buf)
        if buf[:6] == V1_PREFIX[: min(n, 6)]:
            end = buf.find(b"\r\n", 0, V1_MAX)
            if end < 0:
                if n >= V1_MAX:
                    raise ProxyError("v1 header longer than 107 octets or without CRLF")
                if b"\n" in buf or b"\r" in buf[:-1]:
                    raise ProxyError("v1 header with a bare CR or LF")
                return None
            src, dst = _parse_v1(buf[:end])
            return ProxyHeader(1, src, dst, buf[end + 2 :])
        if buf[:12] == V2_SIGNATURE[: min(n, 12)]:
            if n < 16:
                return None
            ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
            if length > V2_MAX_PAYLOAD:
                raise ProxyError(f"v2 header of {length} octets is too long")
            if n < 16 + length:
                return None
            src, dst = _parse_v2(ver_cmd, fam, buf[16 : 16 + length])
            return ProxyHeader(2, src, dst, buf[16 + length :])
        raise ProxyError("connection does not start with a PROXY header")


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 header (for `pop3d health --proxy` and tests); None addresses give `PROXY UNKNOWN`."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    fam = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {fam} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None, tlvs: bytes = b"") -> bytes:
    """A v2 header; None addresses give a LOCAL command (the proxy speaking for itself)."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    s, d = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    fam = 0x11 if s.version == 4 else 0x21
    payload = s.packed + d.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(payload)) + payload
