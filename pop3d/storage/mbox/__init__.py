"""The mbox driver: a /var/mail spool read in place (format, index, spool locks, journaled commit)."""
