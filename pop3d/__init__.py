"""pop3d: a POP3 server (RFC 1939, 2449, 3206) on asyncio, for Maildir and mbox maildrops."""

__version__ = "0.1.0"
