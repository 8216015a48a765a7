"""LMTP delivery (RFC 2033): an MTA hands mail to pop3d, which stores it through `Storage.deliver`.

recipient.py (RCPT TO -> user name), trace.py (Return-Path/Received), handler.py (the aiosmtpd hooks: one
lookup per RCPT, one reply per recipient after DATA), protocol.py (aiosmtpd's LMTP with pop3d's limits and
the gate that admits trusted peers), service.py (the listeners of one worker). The LMTP conversation
itself (LHLO, MAIL, RCPT, DATA, dot-unstuffing) is aiosmtpd's.
"""
