"""The Maildir driver: one file per message, sizes and UIDs from file names and a size cache.

names.py (file-name grammar, UIDs), sizecache.py (`.pop3d.sizes`), scan.py (the login snapshot), drop.py
(the Storage and Maildrop of the interface).
"""

from pop3d.storage.maildir.drop import MaildirDrop, MaildirStorage

__all__ = ["MaildirDrop", "MaildirStorage"]
