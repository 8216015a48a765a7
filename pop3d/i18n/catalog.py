"""Reading the gettext catalogs: one `Translation` per language, from the .po files shipped in the package.

Why .po files read at start (with polib) rather than .mo files compiled at build: nothing is generated, so a
source checkout, `pip install -e .` and a wheel run the very files translators edit, with no build step to
forget. Reading two small catalogs once per process costs a few milliseconds; nothing here runs per command
(pop3d.pop3.catalog turns each language into ready-made replies).

Texts are `str.format` templates with named fields ("{size} octets"). A translation must use exactly the
fields of its msgid: a catalog that does not is refused when it is read, naming the entry.
"""

from __future__ import annotations

import gettext
import string
from collections.abc import Callable
from functools import cache
from importlib import resources

import polib

from pop3d.i18n.languages import LANGUAGES, SOURCE

DOMAIN = "pop3d"
#: msgctxt of the entry whose msgid is "English": its translation is the language's name in itself
#: (RFC 6856 §3.2: the LANG listing describes each language "in the language itself")
NAME_CONTEXT = "language-name"
SOURCE_NAME = "English"


class CatalogError(ValueError):
    """A catalog file that cannot be used (missing, unreadable, or a translation with other fields)."""


def fields(template: str) -> list[str]:
    """The named fields of a str.format template, in order of appearance (repeats kept)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class Translation:
    """One language's texts: `gettext`/`plural` look a msgid up, falling back to the English msgid."""

    __slots__ = ("_plurals", "_singulars", "name", "plural_index", "tag")

    def __init__(
        self,
        tag: str,
        name: str,
        singulars: dict[str, str],
        plurals: dict[tuple[str, str], tuple[str, ...]],
        plural_index: Callable[[int], int],
    ) -> None:
        self.tag = tag
        self.name = name  # the language's name in itself (the LANG listing)
        self._singulars = singulars
        self._plurals = plurals
        #: gettext's Plural-Forms rule: which form a count takes (English: n != 1; French: n > 1)
        self.plural_index = plural_index

    def gettext(self, msgid: str) -> str:
        return self._singulars.get(msgid) or msgid

    def plural(self, msgid: str, msgid_plural: str) -> tuple[str, ...]:
        """Every plural form, indexed by `plural_index(n)`."""
        return self._plurals.get((msgid, msgid_plural)) or (msgid, msgid_plural)

    def msgids(self) -> set[str]:
        """The msgids this catalog translates (plural entries by their singular msgid)."""
        return set(self._singulars) | {m for m, _ in self._plurals}


def _english() -> Translation:
    return Translation(SOURCE, SOURCE_NAME, {}, {}, lambda n: int(n != 1))


def path(tag: str) -> resources.abc.Traversable:
    return resources.files("pop3d") / "locale" / tag / "LC_MESSAGES" / f"{DOMAIN}.po"


def template_path() -> resources.abc.Traversable:
    return resources.files("pop3d") / "locale" / f"{DOMAIN}.pot"


def _check_fields(translated: str, msgid: str) -> None:
    if sorted(fields(translated)) != sorted(fields(msgid)):
        raise CatalogError(f"translation of {msgid!r} uses fields {fields(translated)}, not {fields(msgid)}")


def parse(tag: str, text: str) -> Translation:
    """A Translation from the text of a .po file (fuzzy and obsolete entries are ignored, as gettext does)."""
    po = polib.pofile(text)
    try:
        plural_index = gettext.c2py(po.metadata["Plural-Forms"].split("plural=", 1)[1].rstrip("; "))
    except (KeyError, IndexError, ValueError) as exc:
        raise CatalogError(f"{tag}: no usable Plural-Forms header ({exc})") from None
    name = ""
    singulars: dict[str, str] = {}
    plurals: dict[tuple[str, str], tuple[str, ...]] = {}
    for entry in po:
        if entry.obsolete or "fuzzy" in entry.flags:
            continue
        if entry.msgctxt == NAME_CONTEXT:
            name = entry.msgstr
        elif entry.msgctxt:
            raise CatalogError(f"{tag}: unexpected msgctxt {entry.msgctxt!r}")
        elif entry.msgid_plural:
            forms = tuple(entry.msgstr_plural[i] for i in sorted(entry.msgstr_plural))
            if all(forms):
                for form in forms:
                    _check_fields(form, entry.msgid_plural)
                plurals[entry.msgid, entry.msgid_plural] = forms
        elif entry.msgstr:
            _check_fields(entry.msgstr, entry.msgid)
            singulars[entry.msgid] = entry.msgstr
    if not name:
        raise CatalogError(f"{tag}: no name for the language (msgctxt {NAME_CONTEXT!r}, msgid {SOURCE_NAME!r})")
    return Translation(tag, name, singulars, plurals, plural_index)


@cache
def translation(tag: str) -> Translation:
    """The catalog of `tag` (one of languages.LANGUAGES), read once per process."""
    if tag == SOURCE:
        return _english()
    if tag not in LANGUAGES:
        raise CatalogError(f"no catalog for language {tag!r} (have: {', '.join(LANGUAGES)})")
    try:
        text = path(tag).read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{tag}: cannot read its catalog: {exc}") from None
    return parse(tag, text)
