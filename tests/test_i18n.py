"""Message catalogs: every English text has a French one with the same fields, the .pot lists exactly the texts
the code uses, the catalogs ship with the package, and server.language is checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import polib
import pytest

from pop3d.config import ConfigError, load_settings
from pop3d.i18n import catalog as po
from pop3d.i18n.languages import LANGUAGES, SOURCE
from pop3d.pop3 import catalog
from pop3d.pop3.protocol import CommandParser, State

ROOT = Path(__file__).resolve().parent.parent
LOCALE = ROOT / "pop3d" / "locale"
TRANSLATED = [tag for tag in LANGUAGES if tag != SOURCE]


def entries(path: Path) -> dict[str, polib.POEntry]:
    return {e.msgid: e for e in polib.pofile(str(path)) if not e.msgctxt}


def test_template_lists_exactly_the_texts_the_code_uses() -> None:
    pot = entries(LOCALE / "pop3d.pot")
    singular = {m for m, e in pot.items() if not e.msgid_plural}
    plural = {(e.msgid, e.msgid_plural) for e in pot.values() if e.msgid_plural}
    assert singular == set(catalog.MESSAGES), "pop3d.pot is out of date with pop3d.pop3.catalog / protocol"
    assert plural == set(catalog.PLURALS)
    for e in pot.values():  # every field-bearing msgid is marked for translators' tools
        assert ("python-brace-format" in e.flags) == ("{" in e.msgid + e.msgid_plural), e.msgid


@pytest.mark.parametrize("tag", TRANSLATED)
def test_every_english_text_has_a_translation_with_the_same_fields(tag: str) -> None:
    pot = entries(LOCALE / "pop3d.pot")
    translated = entries(LOCALE / tag / "LC_MESSAGES" / "pop3d.po")
    assert set(translated) == set(pot)
    for msgid, e in translated.items():
        assert not e.obsolete and "fuzzy" not in e.flags, msgid
        if e.msgid_plural:
            assert e.msgid_plural == pot[msgid].msgid_plural
            forms = [e.msgstr_plural[i] for i in sorted(e.msgstr_plural)]
            assert len(forms) == 2 and all(f.strip() for f in forms), msgid  # nplurals=2
            for form in forms:
                assert sorted(po.fields(form)) == sorted(po.fields(e.msgid_plural)), msgid
        else:
            assert e.msgstr.strip(), f"{tag}: no translation for {msgid!r}"
            assert sorted(po.fields(e.msgstr)) == sorted(po.fields(msgid)), msgid
            assert "\n" not in e.msgstr and "\r" not in e.msgstr, msgid  # one reply line
    assert po.translation(tag).name  # the LANG listing names the language in itself


def test_locale_directories_match_the_language_list() -> None:
    assert sorted(p.name for p in LOCALE.iterdir() if p.is_dir()) == sorted(TRANSLATED)
    assert LANGUAGES[0] == SOURCE == "en"


def test_package_data_ships_the_catalogs() -> None:
    """A wheel carries what [tool.setuptools.package-data] matches: every catalog file must be matched."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pop3d"]
    files = {p.relative_to(ROOT / "pop3d") for p in LOCALE.rglob("*.po*")}
    assert files and all(any(f.match(glob) for glob in data) for f in files), (files, data)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(dep.startswith("polib") for dep in dependencies)


def test_french_replies() -> None:
    fr = catalog.texts("fr", utf8=True)
    assert fr.auth_failed.data == "-ERR [AUTH] échec de l'authentification\r\n".encode()
    assert fr.in_use.data.startswith(b"-ERR [IN-USE] ")
    assert fr.logged_in(0, "alice", 0) == "alice a 0 message (0 octets)"  # French: 0 takes the singular
    assert fr.logged_in(1, "alice", 5) == "alice a 1 message (5 octets)"
    assert fr.logged_in(2, "alice", 9) == "alice a 2 messages (9 octets)"
    en = catalog.texts("en")
    assert en.logged_in(0, "alice", 0) == "alice has 0 messages (0 octets)"
    assert en.signed_off(1) == "pop3d signing off (1 message left)"
    assert fr.lang_changed.data == "+OK fr Langue modifiée\r\n".encode()


def test_ascii_fold_before_utf8_mode() -> None:
    """RFC 6856 §2.1: no non-ASCII text before UTF8/LANG: the folded French texts are pure ASCII."""
    folded = catalog.texts("fr")
    assert not folded.utf8
    assert folded.greeting("<1.2@h>") == "pop3d pret <1.2@h>"
    for name, value in vars(folded).items():
        data = getattr(value, "data", value)
        if isinstance(data, bytes) or (isinstance(data, str) and name != "name"):
            assert data.isascii(), name
    assert catalog.texts("en") is catalog.texts("en", utf8=False)  # English is one table, ASCII already


def test_codes_and_machine_parts_never_change() -> None:
    """Only the text after +OK/-ERR (and a response code) is translated: the code itself stays."""
    en, fr = catalog.texts("en"), catalog.texts("fr", utf8=True)
    for name, value in vars(en).items():
        data = getattr(value, "data", value)
        if isinstance(data, bytes):
            other = getattr(getattr(fr, name), "data", getattr(fr, name))
            code = re.match(rb"[-+][A-Z]+( \[[A-Z/-]+\])?", data)
            assert code is not None and other.startswith(code[0]), name
    assert fr.octets(1234) == "1234 octets"


def test_parser_rejections_are_translated() -> None:
    parser = CommandParser.with_extensions(stls=False)
    fr = catalog.texts("fr", utf8=True)
    reject = parser.parse(b"TOP 1", State.TRANSACTION)
    assert fr.rejection(reject) == b"-ERR TOP : exactement 2 arguments requis\r\n"  # type: ignore[arg-type]
    assert catalog.texts("en").rejection(reject) is reject.reply  # type: ignore[union-attr,arg-type]
    auth = parser.parse(b"AUTH PLAIN !!", State.AUTHORIZATION)
    assert fr.rejection(auth).startswith(b"-ERR [AUTH] AUTH : ")  # type: ignore[arg-type]
    assert fr.rejection(parser.parse(b"FOO", State.AUTHORIZATION)) == b"-ERR commande inconnue\r\n"  # type: ignore[arg-type]


def test_positional_rewrite_follows_the_translation_order() -> None:
    fmt = catalog.positional("{size} octets in {count} {{braces}}", ("count", "size"))
    assert fmt(3, 99) == "99 octets in 3 {braces}"
    with pytest.raises(po.CatalogError):
        catalog.positional("{nope}", ("count",))


def test_a_translation_with_other_fields_is_refused() -> None:
    text = (LOCALE / "fr" / "LC_MESSAGES" / "pop3d.po").read_text()
    broken = text.replace('msgstr "message {number} supprimé"', 'msgstr "message {numero} supprimé"')
    assert broken != text
    with pytest.raises(po.CatalogError, match="fields"):
        po.parse("fr", broken)
    assert po.parse("fr", text).gettext("message {number} deleted") == "message {number} supprimé"


def test_server_language_is_checked() -> None:
    assert load_settings(None).server.language == "en"
    assert load_settings(None, server={"language": "FR"}).server.language == "fr"
    with pytest.raises(ConfigError, match="language"):
        load_settings(None, server={"language": "de"})
