"""The mbox driver: a /var/mail spool read in place (format, index, spool locks, journaled commit)."""

from pop3d.storage.mbox.drop import MboxDrop, MboxStorage

__all__ = ["MboxDrop", "MboxStorage"]
