"""poppassd: the password-change service of Eudora and qpopper (`poppassd.listen`), over implicit TLS only.

`protocol` is the sans-IO core (lines, commands, replies); `session` the asyncio.Protocol that runs it with the
server's user database, brute-force penalty and connection limits. pop3d.runtime.server starts the listeners.
"""
