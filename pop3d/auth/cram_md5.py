"""HMAC-MD5 "contexts" for CRAM-MD5 (RFC 2195) from a stored secret, in Dovecot's {CRAM-MD5} format.

Why this module computes MD5 block by block: a CRAM-MD5 server that does not keep the clear password keeps the
two HMAC-MD5 intermediate states instead (RFC 2104 §4: MD5 after the 64-octet K^opad and K^ipad blocks). No
maintained Python library exposes an MD5 state after one block, so the compression function (RFC 1321 §3.4)
is written here; every result is checked against hashlib/hmac in tests/test_sasl.py.

Stored format (Dovecot's `hmac_md5_get_cram_context`): 64 hex digits = 32 octets, the outer state (a, b, c, d)
then the inner state, each word little-endian. It is password-equivalent for CRAM-MD5 and unsalted: treat the
passwd-file like a file of passwords.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from typing import Final

_MASK: Final = 0xFFFFFFFF
_INIT: Final = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)  # RFC 1321 §3.3
_SHIFTS: Final = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K: Final = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]  # RFC 1321 §3.4 table T

State = tuple[int, int, int, int]


def _compress(state: State, block: bytes) -> State:
    """One MD5 compression of a 64-octet block (RFC 1321 §3.4)."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _K[i] + x[g]) & _MASK
        a, d, c = d, c, b
        b = (b + (((f << _SHIFTS[i]) | (f >> (32 - _SHIFTS[i]))) & _MASK)) & _MASK
    return ((state[0] + a) & _MASK, (state[1] + b) & _MASK, (state[2] + c) & _MASK, (state[3] + d) & _MASK)


def _finish(state: State, data: bytes, done: int) -> bytes:
    """The MD5 digest of (`done` octets already folded into `state`) + `data` (RFC 1321 §3.1-3.2 padding)."""
    total = done + len(data)
    data += b"\x80" + b"\0" * ((55 - total) % 64) + struct.pack("<Q", (total * 8) & (2**64 - 1))
    for off in range(0, len(data), 64):
        state = _compress(state, data[off : off + 64])
    return struct.pack("<4I", *state)


def _pads(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > 64:  # RFC 2104 §2: longer keys are hashed first
        key = hashlib.md5(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(k ^ 0x36 for k in key), bytes(k ^ 0x5C for k in key)


def context(password: str) -> str:
    """The {CRAM-MD5} secret (64 hex digits) for `password`."""
    ipad, opad = _pads(password.encode("utf-8", "surrogateescape"))
    outer, inner = _compress(_INIT, opad), _compress(_INIT, ipad)
    return struct.pack("<8I", *outer, *inner).hex()


def digest_from_context(secret: str, challenge: bytes) -> str:
    """HMAC-MD5(password, challenge) as lower-case hex, from the stored context only. ValueError if malformed."""
    raw = bytes.fromhex(secret)
    if len(raw) != 32:
        raise ValueError("a CRAM-MD5 context is 32 octets")
    words = struct.unpack("<8I", raw)
    outer: State = (words[0], words[1], words[2], words[3])
    inner: State = (words[4], words[5], words[6], words[7])
    inner_digest = _finish(inner, challenge, 64)
    return _finish(outer, inner_digest, 64).hex()


def digest_from_password(password: str, challenge: bytes) -> str:
    """HMAC-MD5 as RFC 2195 §2 computes it, from the clear password."""
    return hmac.new(password.encode("utf-8", "surrogateescape"), challenge, "md5").hexdigest()


def verify_password(secret: str, password: str) -> bool:
    """USER/PASS (or PLAIN) against a {CRAM-MD5} entry: recompute the context and compare."""
    return hmac.compare_digest(context(password), secret.strip().lower())
