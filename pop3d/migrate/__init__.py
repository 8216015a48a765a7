"""Moving to pop3d from another POP3 server: `pop3d uidl import` keeps the UIDLs clients remember."""
