"""Every human-readable reply text, per language, built once: the session and the handlers only look up.

The msgids (English, `str.format` templates with named fields) are declared here, and nowhere else in the
handlers or the session; pop3d/locale/pop3d.pot lists them and each language's .po translates them
(pop3d.i18n.catalog reads those). `texts(tag)` is the `Texts` of one language: constant replies are ready-made
`Reply` objects or bytes, formatted ones are bound `str.format` methods of the translated template rewritten to
positional fields once, so a reply costs what an f-string did (docs/DESIGN.md performance rule 5: nothing
per session but a reference, nothing per command but an attribute lookup).

Only the text after +OK/-ERR changes with the language (RFC 6856 §3.2): response codes in brackets, numbers
that clients read (STAT, LIST, UIDL lines, octet counts of LIST n) and CAPA lines never do.

Each language comes twice: in UTF-8, and folded to ASCII ("prêt" -> "pret"). RFC 6856 §2.1: until UTF-8 mode
is on, "character strings outside the ASCII repertoire MUST NOT be sent to the client as is", so a session
starts with the ASCII form of `server.language` (the greeting included) and moves to the UTF-8 form after
UTF8 or LANG (§3.2: the text after a successful LANG "is encoded in the UTF-8 charset"). English is ASCII.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Callable

from pop3d.i18n.catalog import CatalogError, Translation, translation
from pop3d.i18n.languages import LANGUAGES, SOURCE
from pop3d.pop3.protocol import MAX_SASL_LINE, Rejected, Text, err, ok
from pop3d.pop3.protocol import MESSAGES as PARSER_MESSAGES
from pop3d.pop3.results import Reply, StartTLS

# -- the msgids ---------------------------------------------------------------------------------------------------

GREETING = "pop3d ready {timestamp}"  # RFC 1939 §4, with the APOP timestamp (§7)
AUTH_FAILED = "authentication failed"  # RFC 3206 §4 [AUTH]; the same for unknown user and bad password
PLAINTEXT_REFUSED = "plaintext authentication disallowed on non-secure connections (use STLS or port 995)"
SEND_PASS = "send PASS"
USER_FIRST = "USER first"
BEGIN_TLS = "Begin TLS negotiation"
ALREADY_TLS = "already using TLS"
NO_TLS = "TLS is not configured"
RPOP_REFUSED = "RPOP is not offered: trust by source port is unsafe; use PASS, APOP or AUTH"
SIGNING_OFF = "pop3d signing off"
SASL_CANCELLED = "authentication cancelled"
SASL_NOT_BASE64 = "SASL response is not valid base64"
SASL_TOO_LONG = "SASL response too long (limit {limit} octets)"
LOGIN_DELAY = "wait {seconds} seconds between logins"
IN_USE = "maildrop already locked by another session"
OPEN_FAILED = "maildrop cannot be opened"
LOGGED_IN = ("{user} has {count} message ({size} octets)", "{user} has {count} messages ({size} octets)")
SASL_LIST = "SASL mechanisms follow"
EXTERNAL_NEEDS_CERT = "EXTERNAL needs a verified TLS client certificate"
UNSUPPORTED_MECHANISM = "unsupported authentication mechanism {mechanism}"
INITIAL_NOT_BASE64 = "initial response is not valid base64"
CAPA_LIST = "Capability list follows"
COMMIT_FAILED = "some deleted messages were not removed"
SIGNED_OFF = ("pop3d signing off ({count} message left)", "pop3d signing off ({count} messages left)")
NO_SUCH_MESSAGE = "no such message, only {count} in maildrop"
ALREADY_DELETED = "message {number} already deleted"
LISTING = "{count} messages ({size} octets)"
UIDL_LIST = "unique-id listing follows"
DELETED = "message {number} deleted"
RSET_DONE = ("maildrop has {count} message ({size} octets)", "maildrop has {count} messages ({size} octets)")
OCTETS = "{size} octets"
TOP_FOLLOWS = "top of message follows"
READ_FAILED = "message {number} cannot be read now"
NEEDS_UTF8 = "message {number} has UTF-8 headers: send UTF8 first"
# RFC 6856
UTF8_ON = "UTF-8 mode enabled"
STLS_AFTER_UTF8 = "STLS is not allowed after UTF8"
BAD_USER_NAME = "user name refused: not a valid SASLprep string (RFC 6856)"
LANG_LIST = "Language listing follows"
LANG_CHANGED = "Language changed"
LANG_UNKNOWN = "unknown language {language}"
# the session
INTERNAL_ERROR = "internal server error"
TOO_MANY_BAD = "too many bad commands, closing connection"
TRY_LATER = "{reason}, try again later"
PER_IP = "too many connections from your address"
FULL = "too many connections"
LOGIN_TIMEOUT = "login timeout: log in sooner"
AUTOLOGOUT = "autologout: idle for too long"
LOCK_LOST = "maildrop lock lost, nothing was changed: log in again"
SHUTTING_DOWN = "server shutting down"

_SINGULAR = (
    GREETING, AUTH_FAILED, PLAINTEXT_REFUSED, SEND_PASS, USER_FIRST, BEGIN_TLS, ALREADY_TLS, NO_TLS, RPOP_REFUSED,
    SIGNING_OFF, SASL_CANCELLED, SASL_NOT_BASE64, SASL_TOO_LONG, LOGIN_DELAY, IN_USE, OPEN_FAILED, SASL_LIST,
    EXTERNAL_NEEDS_CERT, UNSUPPORTED_MECHANISM, INITIAL_NOT_BASE64, CAPA_LIST, COMMIT_FAILED, NO_SUCH_MESSAGE,
    ALREADY_DELETED, LISTING, UIDL_LIST, DELETED, OCTETS, TOP_FOLLOWS, READ_FAILED, NEEDS_UTF8, UTF8_ON,
    STLS_AFTER_UTF8, BAD_USER_NAME, LANG_LIST, LANG_CHANGED, LANG_UNKNOWN, INTERNAL_ERROR, TOO_MANY_BAD,
    TRY_LATER, PER_IP, FULL, LOGIN_TIMEOUT, AUTOLOGOUT, LOCK_LOST, SHUTTING_DOWN,
)  # fmt: skip
#: every msgid pop3d replies with (the parser's too), and the plural pairs: what pop3d.pot must hold
MESSAGES: tuple[str, ...] = (*_SINGULAR, *PARSER_MESSAGES)
PLURALS: tuple[tuple[str, str], ...] = (LOGGED_IN, SIGNED_OFF, RSET_DONE)


# -- templates to positional format calls -------------------------------------------------------------------------


def positional(template: str, names: tuple[str, ...]) -> Callable[..., str]:
    """`template`'s named fields rewritten to the positions of `names`: a bound str.format taking positional
    arguments (about twice as fast as keyword arguments), whatever order a translation puts the fields in."""
    out: list[str] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            if field not in names:
                raise CatalogError(f"{template!r}: unknown field {field!r} (expected {', '.join(names)})")
            out.append(
                "{"
                + str(names.index(field))
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
    return "".join(out).format


def ascii_fold(text: str) -> str:
    """`text` without what ASCII cannot say: accents dropped (NFKD, then combining marks removed)."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


class _Folded:
    """A Translation seen through ascii_fold (same interface as far as Texts and Plural use it)."""

    def __init__(self, tr: Translation) -> None:
        self.tag, self.name, self.plural_index, self._tr = tr.tag, ascii_fold(tr.name), tr.plural_index, tr

    def gettext(self, msgid: str) -> str:
        return ascii_fold(self._tr.gettext(msgid))

    def plural(self, msgid: str, msgid_plural: str) -> tuple[str, ...]:
        return tuple(ascii_fold(form) for form in self._tr.plural(msgid, msgid_plural))


class Plural:
    """A counted text: the form gettext's Plural-Forms rule picks for the count, then formatted."""

    __slots__ = ("_forms", "_index")

    def __init__(self, tr: Translation | _Folded, pair: tuple[str, str], names: tuple[str, ...]) -> None:
        self._forms = tuple(positional(form, names) for form in tr.plural(*pair))
        self._index = tr.plural_index

    def __call__(self, count: int, *args: object) -> str:
        """`count` is the first field; `args` the others, in the declared order."""
        return self._forms[self._index(count)](count, *args)


class Texts:
    """The replies of one language. One object per language per process, shared by every session."""

    def __init__(self, translation: Translation, utf8: bool) -> None:
        tr: Translation | _Folded = translation if utf8 or translation.tag == SOURCE else _Folded(translation)
        t = tr.gettext
        self.language = tr.tag
        self.utf8 = utf8  # UTF-8 text allowed (RFC 6856 §2.1, §3.2); False: the ASCII fold
        self.name = translation.name  # the language's name in itself (the LANG listing is UTF-8)
        self.english = tr.tag == SOURCE
        self._tr = tr
        # -- AUTHORIZATION
        self.greeting = positional(t(GREETING), ("timestamp",))
        self.auth_failed = Reply(err(t(AUTH_FAILED), "AUTH"))
        #: the same -ERR [AUTH] line, then the connection closes (auth.max_failures_per_connection)
        self.too_many_failures = Reply(self.auth_failed.data, close=True, reason="too many authentication failures")
        #: Dovecot's wording; RFC 3206 §4 [AUTH]: the client should not retry the same way
        self.plaintext_refused = Reply(err(t(PLAINTEXT_REFUSED), "AUTH"))
        self.send_pass = Reply(ok(t(SEND_PASS)))
        self.user_first = Reply(err(t(USER_FIRST)))
        self.begin_tls = StartTLS(ok(t(BEGIN_TLS)))
        self.already_tls = Reply(err(t(ALREADY_TLS)))
        self.no_tls = Reply(err(t(NO_TLS)))
        self.rpop_refused = Reply(err(t(RPOP_REFUSED)))
        self.signing_off = Reply(ok(t(SIGNING_OFF)), close=True, reason="QUIT")
        self.sasl_cancelled = Reply(err(t(SASL_CANCELLED), "AUTH"))
        self.sasl_not_base64 = Reply(err(t(SASL_NOT_BASE64), "AUTH"))
        self.sasl_too_long = Reply(err(positional(t(SASL_TOO_LONG), ("limit",))(MAX_SASL_LINE), "AUTH"))
        self.login_delay = positional(t(LOGIN_DELAY), ("seconds",))
        self.in_use = Reply(err(t(IN_USE), "IN-USE"))  # RFC 2449 §8.1.1
        self.open_failed = t(OPEN_FAILED)  # with the storage error's code (RFC 3206 §4 SYS/TEMP or SYS/PERM)
        self.logged_in = Plural(tr, LOGGED_IN, ("count", "user", "size"))
        self.sasl_list = ok(t(SASL_LIST))
        self.external_needs_cert = Reply(err(t(EXTERNAL_NEEDS_CERT), "AUTH"))
        self.unsupported_mechanism = positional(t(UNSUPPORTED_MECHANISM), ("mechanism",))
        self.initial_not_base64 = Reply(err(t(INITIAL_NOT_BASE64), "AUTH"))
        self.capa_list = ok(t(CAPA_LIST))
        # -- RFC 6856
        self.utf8_on = Reply(ok(t(UTF8_ON)))
        self.stls_after_utf8 = Reply(err(t(STLS_AFTER_UTF8)))  # §2.1: a protocol error, so no response code
        self.bad_user_name = Reply(err(t(BAD_USER_NAME), "AUTH"))
        self.lang_list = ok(t(LANG_LIST))
        #: §3.2: "+OK", the exact tag selected, then text in that language (this is the new language's answer)
        self.lang_changed = Reply(ok(f"{tr.tag} {t(LANG_CHANGED)}"))
        self.lang_unknown = positional(t(LANG_UNKNOWN), ("language",))
        # -- TRANSACTION and UPDATE
        self.commit_failed = t(COMMIT_FAILED)
        self.signed_off = Plural(tr, SIGNED_OFF, ("count",))
        self.no_such_message = positional(t(NO_SUCH_MESSAGE), ("count",))
        self.already_deleted = positional(t(ALREADY_DELETED), ("number",))
        self.listing = positional(t(LISTING), ("count", "size"))
        self.uidl_list = ok(t(UIDL_LIST))
        self.deleted = positional(t(DELETED), ("number",))
        self.rset_done = Plural(tr, RSET_DONE, ("count", "size"))
        self.octets = positional(t(OCTETS), ("size",))
        self.top_follows = ok(t(TOP_FOLLOWS))
        self.read_failed = positional(t(READ_FAILED), ("number",))
        self.needs_utf8 = positional(t(NEEDS_UTF8), ("number",))
        # -- the session
        self.internal_error = err(t(INTERNAL_ERROR), "SYS/TEMP")
        self.too_many_bad = err(t(TOO_MANY_BAD))
        later = positional(t(TRY_LATER), ("reason",))
        #: connection limits (pop3d.net.limits Refused, by its English reason) -> the -ERR [SYS/TEMP] line
        self.refusals = {reason: err(later(t(reason)), "SYS/TEMP") for reason in (PER_IP, FULL)}
        self.too_many_connections = self.refusals[FULL]
        self.login_timeout = err(t(LOGIN_TIMEOUT))
        self.autologout = err(t(AUTOLOGOUT))
        self.lock_lost = err(t(LOCK_LOST), "SYS/TEMP")
        self.shutting_down = err(t(SHUTTING_DOWN), "SYS/TEMP")

    def refused(self, reason: str) -> bytes:
        """The -ERR [SYS/TEMP] line for a connection-limit refusal (RFC 3206 §4)."""
        line = self.refusals.get(reason)
        return line if line is not None else err(f"{reason}, try again later", "SYS/TEMP")

    def render(self, text: Text) -> str:
        """A parser text in this language (its values translated too when they are texts)."""
        template = self._tr.gettext(text.msgid)
        if not text.values:
            return template
        values = {k: self.render(v) if isinstance(v, Text) else v for k, v in text.values}
        return template.format(**values)

    def rejection(self, event: Rejected) -> bytes:
        """The -ERR line for a line the parser refused, in this language (English: the parser's own bytes)."""
        if self.english or event.text is None:
            return event.reply
        return err(self.render(event.text), event.code)


def _build() -> dict[tuple[str, bool], Texts]:
    return {(tag, utf8): Texts(translation(tag), utf8) for tag in LANGUAGES for utf8 in (False, True)}


#: every language's texts, ASCII and UTF-8, built when this module is first imported (before workers fork)
TEXTS: dict[tuple[str, bool], Texts] = _build()


def texts(tag: str, utf8: bool = False) -> Texts:
    """The texts of `tag` (a languages.LANGUAGES tag; config refuses any other), in UTF-8 or folded to ASCII."""
    return TEXTS[tag, utf8]


def match(language_range: str) -> Texts | None:
    """RFC 4647 §3.3.1 basic filtering of the LANG argument against our tags: the range equals a tag or is a
    prefix of one followed by "-", case-insensitively ("*" is handled by the caller: the server's default)."""
    wanted = language_range.lower()
    for tag in LANGUAGES:
        if tag == wanted or tag.startswith(wanted + "-"):
            return TEXTS[tag, True]
    return None
