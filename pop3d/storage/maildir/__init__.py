"""The Maildir driver: one file per message, sizes and UIDs from file names and a size cache."""
