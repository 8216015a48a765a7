"""Internationalisation: the message catalogs (gettext .po files under pop3d/locale) and SASLprep.

Below the POP3 layer and above config: pure data and string preparation, no protocol, no I/O beyond reading
the package's own catalog files once.
"""
