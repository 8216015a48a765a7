"""One pydantic-settings model for the whole server: TOML file, then `POP3D_<SECTION>__<KEY>` env overrides.

Key names are an interface other tools depend on (`server.listen`, `server.hostname`, `auth.passwd_file`,
`storage.driver`, `storage.location`); keep them. `config.example.toml` documents every key.
Unknown keys are errors: a typo in a config file, or in a variable name, must not silently fall back to a
default. The variables are parsed here (`env_overrides`), not by pydantic-settings, so that an error names the
variable and its value in one line and a variable that names no key is refused.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import logging
import os
import re
import socket
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# leaf modules that import no server code: the names they define are not restated here
from pop3d.auth.mechanisms import KNOWN as KNOWN_MECHANISMS
from pop3d.i18n.languages import LANGUAGES

_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})$")


def parse_hostport(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port); an empty host means all addresses."""
    m = _HOSTPORT.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not host:port (use [addr]:port for IPv6)")
    port = int(m["port"])
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return (m["v6"] if m["v6"] is not None else m["host"]), port


def target_address(value: str, what: str) -> tuple[str, int]:
    """A command-line HOST:PORT to connect to (an empty host means this machine); ConfigError names `what`."""
    try:
        host, port = parse_hostport(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return host or "127.0.0.1", port


def _listen_addresses(v: list[str]) -> list[str]:
    for item in v:
        parse_hostport(item)
    return v


#: a list of "host:port" listener addresses, each checked by parse_hostport
Listen = Annotated[list[str], AfterValidator(_listen_addresses)]


def _networks(v: list[str]) -> list[str]:
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR network") from None
    return v


#: a list of addresses or CIDR networks (IPv4 or IPv6)
NetworkList = Annotated[list[str], AfterValidator(_networks)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(_Section):
    listen: Listen = Field(default_factory=lambda: ["0.0.0.0:110"])
    hostname: str = Field(default_factory=socket.getfqdn)
    backlog: int = Field(1024, ge=1)
    #: worker processes, one event loop each, sharing the listen ports with SO_REUSEPORT (1 = no fork);
    #: 0: one per CPU the process may use (cgroup quota, affinity), counted at start (pop3d.runtime.cpus)
    workers: int = Field(0, ge=0, le=1024)
    #: seconds to let sessions finish after SIGTERM/SIGINT before cutting them (cut sessions delete nothing)
    shutdown_grace: float = Field(10.0, ge=0)
    #: bytes buffered per connection before the session stops producing (pause_writing)
    write_buffer: int = Field(256 * 1024, ge=16 * 1024)
    #: implicit-TLS listeners (RFC 8314 §3.3, usually ":995"); need tls.cert and tls.key
    tls_listen: Listen = Field(default_factory=list)
    #: expect a HAProxy PROXY v1/v2 header first on every connection (pop3d.net.proxy); live on SIGHUP
    proxy_protocol: bool = False
    #: peers allowed to send that header (CIDRs); anyone else is disconnected
    proxy_trusted: NetworkList = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    #: where pop3d keeps state across restarts: the secret that fixes decoy credentials for unknown users
    #: (pop3d.auth.state_secret); unusable -> a warning and a per-process secret
    state_dir: Path = Path("/var/lib/pop3d")

    # -- connection limits (pop3d.net.limits); a refused client hears -ERR [SYS/TEMP] (RFC 3206 §4) --
    #: connections one client address may hold at once (IPv6: per /64); 0 = no limit
    max_connections_per_ip: int = Field(50, ge=0)
    #: addresses max_connections_per_ip does not count (CIDRs); loopback by default, for local probes and
    #: benchmarks. Only the per-address limit: max_connections and max_unauthenticated count everyone
    limit_exempt: NetworkList = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: connections of the whole server; 0 = what the open-files limit allows, per worker
    #: ((RLIMIT_NOFILE after pop3d raised it - 128) / 2: a socket and a maildrop lock per session)
    max_connections: int = Field(0, ge=0)
    #: connections not logged in yet, server-wide; when full, the oldest one is closed to admit the new one
    #: (logged-in sessions never are); 0 = no limit
    max_unauthenticated: int = Field(20000, ge=0)

    #: started as root: bind the sockets, read the TLS key, then switch every process to this user for good
    #: (pop3d.runtime.privileges); "" = stay root (a warning at start says what that risks)
    user: str = ""
    #: the group to switch to; "" = the user's primary group (supplementary groups come from /etc/group)
    group: str = ""
    #: the language of reply texts until a client picks another with LANG (RFC 6856 §3): a tag with a catalog
    #: under pop3d/locale ("en", "fr"); also what "LANG *" selects
    language: str = "en"

    @field_validator("language")
    @classmethod
    def _check_language(cls, v: str) -> str:
        if v.lower() not in LANGUAGES:
            raise ValueError(f"no message catalog for {v!r} (available: {', '.join(LANGUAGES)})")
        return v.lower()


class SessionSettings(_Section):
    #: RFC 1939 §3: the TRANSACTION autologout timer MUST be at least 10 minutes.
    timeout: float = Field(600.0, ge=600)
    #: seconds from connect in which a client must log in, whatever it sends meanwhile (a fixed deadline, as
    #: Dovecot's login timeout: a byte now and then must not keep a login open); RFC 1939 §3 only constrains
    #: the autologout once logged in
    timeout_authorization: float = Field(60.0, gt=0)
    #: RFC 2449 §6.5 LOGIN-DELAY: minimum seconds between logins of one user; 0 disables.
    login_delay: int = Field(0, ge=0)
    #: deprecated spelling of storage.expire_days ("NEVER" or a number of days), still honoured: a start-up
    #: warning asks to move it; setting both to different values is a configuration error
    expire: str | None = None
    #: consecutive bad commands before the connection is closed
    max_bad_commands: int = Field(20, ge=1)
    #: show "IMPLEMENTATION pop3d <version>" in CAPA (RFC 2449 §6.9)
    show_implementation: bool = True
    #: octets of replies a client may leave unread before it logs in; past that it is disconnected (a
    #: login exchange is a few hundred octets, so only a client pipelining without reading gets there)
    max_unsent_before_login: int = Field(16 * 1024, ge=1024)

    @field_validator("expire")
    @classmethod
    def _check_expire(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().upper()
        if v != "NEVER" and not v.isdigit():
            raise ValueError('must be "NEVER" or a number of days')
        return v


class PasswordPolicySettings(_Section):
    """What a new password must be (poppassd; pop3d.auth.policy applies it). Longest: auth.max_password_length."""

    #: characters (code points) a new password needs at least
    min_length: int = Field(10, ge=1, le=1024)
    #: refuse a new password that contains the user name (ignoring case; names of 3 characters or more)
    refuse_user_name: bool = True


class AuthSettings(_Section):
    #: "passwd-file": a Dovecot passwd-file (auth.passwd_file); "postgres": the users table (auth.dsn)
    driver: Literal["passwd-file", "postgres"] = "passwd-file"
    passwd_file: Path = Path("/etc/pop3d/passwd")
    #: postgres: a libpq URI for the users table; "" = storage.dsn (then storage and auth share one pool)
    dsn: str = ""
    #: seconds before the first failed login from an address is answered; doubles with each consecutive
    #: failure from that address up to failure_delay_max, reset by a success (Dovecot: 2 s to 15 s); 0 = off
    failure_delay: float = Field(2.0, ge=0)
    failure_delay_max: float = Field(15.0, ge=0)
    #: failed authentications one connection may make before it is closed (Dovecot closes after 3 too)
    max_failures_per_connection: int = Field(3, ge=1)
    #: octets; a longer password fails like a wrong one, without being hashed (hash cost grows with length)
    max_password_length: int = Field(1024, ge=1)
    #: SASL mechanisms AUTH offers (RFC 5034); CAPA lists those usable on each connection
    mechanisms: list[str] = Field(default_factory=lambda: ["PLAIN", "LOGIN"])
    #: like Dovecot's disable_plaintext_auth: USER/PASS, PLAIN and LOGIN only over TLS or from secure_networks
    disable_plaintext_auth: bool = True
    #: client networks treated as secure without TLS (loopback by default; [] makes loopback insecure too)
    secure_networks: NetworkList = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: seconds a password proved right is remembered (a keyed hash, never the password: pop3d.auth.cred_cache),
    #: so the next login with it skips the slow hash; 0 = off. Live on reload.
    cache_ttl: float = Field(3600.0, ge=0)
    #: entries of that cache (24 octets each, shared by the workers; the oldest go first); 0 = off. Restart.
    cache_size: int = Field(100_000, ge=0, le=4_194_304)
    #: the scheme new passwords are hashed with (poppassd); must be one `pop3d passwd --scheme` offers
    default_scheme: str = "ARGON2ID"
    #: what a new password must be (poppassd)
    password_policy: PasswordPolicySettings = Field(default_factory=PasswordPolicySettings)

    @field_validator("default_scheme")
    @classmethod
    def _check_scheme(cls, v: str) -> str:
        v = v.strip().upper()
        if not v or any(c in v for c in "{}:"):
            raise ValueError("must be a scheme name such as ARGON2ID")
        return v

    @field_validator("mechanisms")
    @classmethod
    def _check_mechanisms(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for m in v:
            name = m.strip().upper()
            if name not in KNOWN_MECHANISMS:
                raise ValueError(f"unknown mechanism {m!r} (known: {', '.join(KNOWN_MECHANISMS)})")
            if name not in out:
                out.append(name)
        return out


class TlsSettings(_Section):
    #: PEM certificate chain and private key; with both set, STLS is offered on plain listeners
    cert: Path | None = None
    key: Path | None = None
    #: PEM CA bundle for client certificates (optional; enables SASL EXTERNAL)
    client_ca: Path | None = None
    #: how a client certificate maps to a login name for EXTERNAL: "cn", "email" or "email-localpart"
    client_identity: Literal["cn", "email", "email-localpart"] = "cn"
    #: seconds a TLS handshake may take
    handshake_timeout: float = Field(30.0, gt=0)


#: the MTA-compatible mbox spool locks (pop3d.storage.mbox.spool_lock implements each)
SpoolLockMethod = Literal["dotlock", "fcntl", "flock"]


def _locks(*methods: SpoolLockMethod) -> Callable[[], list[SpoolLockMethod]]:
    return lambda: list(methods)


class StorageSettings(_Section):
    driver: Literal["maildir", "mbox", "postgres"] = "maildir"
    #: path template; `{user}` is the login name, `{home}` the passwd-file home field
    location: str = "/srv/mail/{user}/Maildir"
    #: Maildir: mark retrieved messages Seen (move to cur/ with :2,S) at QUIT, so IMAP readers agree
    mark_seen: bool = True
    #: mbox: "mboxrd" removes one ">" from ">+From " lines on delivery, "mboxo" leaves them
    mbox_dialect: Literal["mboxrd", "mboxo"] = "mboxrd"  # pop3d.storage.mbox.format reads both
    #: mbox: spool locks taken, in this order, while reading the snapshot / while committing deletions
    mbox_lock_read: list[SpoolLockMethod] = Field(default_factory=_locks("fcntl"))
    mbox_lock_write: list[SpoolLockMethod] = Field(default_factory=_locks("dotlock", "fcntl"))
    #: mbox: seconds to wait for the spool locks before answering -ERR [SYS/TEMP]
    mbox_lock_timeout: float = Field(30.0, ge=0)
    #: mbox: a dotlock naming no live pid and untouched this many seconds is stale and removed
    mbox_dotlock_stale: float = Field(300.0, gt=0)
    #: mbox: directory for pop3d's per-user index, session lock and commit journal; "" = beside the spool
    mbox_index_dir: str = "/var/lib/pop3d/mbox"
    #: RFC 2449 §6.7 EXPIRE, announced in CAPA: "never" (default) keeps mail until the client deletes it; n > 0
    #: deletes messages retrieved at least n days ago when their owner's next session starts; 0 deletes
    #: retrieved messages at QUIT
    expire_days: int | Literal["never"] = "never"

    @field_validator("expire_days", mode="before")
    @classmethod
    def _check_expire_days(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip().lower()
            if text == "never":
                return "never"
            if not (text.isascii() and text.isdigit()):
                raise ValueError('must be "never" or a number of days (0 or more)')
            return int(text)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError('must be "never" or a number of days (0 or more)')
        return v

    #: postgres: a libpq URI (postgresql://user@host:port/db?passfile=...); "" = all from the PG* variables
    dsn: str = ""
    #: postgres: connections per worker process for queries (plus one that holds the maildrop locks)
    pool_size: int = Field(10, ge=1, le=1000)

    @field_validator("mbox_lock_read", "mbox_lock_write")
    @classmethod
    def _check_locks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a lock method is listed twice")
        return v

    @field_validator("location")
    @classmethod
    def _check_location(cls, v: str) -> str:
        if "{user}" not in v and "{home}" not in v:
            raise ValueError("must contain {user} or {home}")
        return v


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: "text" for people, "json" (one object per line) for log shippers
    format: Literal["text", "json"] = "text"
    #: False: the end of a health-check session (no login attempted, ended by QUIT or a hang-up before
    #: login, as `pop3d health` and TCP probes do) is logged at DEBUG instead of INFO
    health_checks: bool = True


class MetricsSettings(_Section):
    #: "host:port" of the Prometheus endpoint (GET /metrics); None = no endpoint
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, v: str | None) -> str | None:
        if v is not None and v != "":
            parse_hostport(v)
        return v or None


class PoppassdSettings(_Section):
    #: "host:port" addresses of the poppassd service (password changes; usually ":106"), implicit TLS with the
    #: [tls] certificate on every one; [] = no poppassd
    listen: Listen = Field(default_factory=list)
    #: seconds one poppassd conversation may take from connect, whatever the client sends meanwhile
    timeout: float = Field(60.0, gt=0)


class LmtpSettings(_Section):
    """LMTP delivery (RFC 2033, pop3d.lmtp): an MTA hands mail to pop3d, which stores it with the storage driver."""

    #: LMTP listeners, e.g. ["127.0.0.1:24"]; [] = no LMTP. Never a PROXY header here (the MTA connects itself)
    listen: Listen = Field(default_factory=list)
    #: peers allowed to deliver (CIDRs); anyone else hears 554 and is disconnected
    trusted: NetworkList = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    #: which part of RCPT TO names the user: "localpart" (bob@example.org -> bob) or "address" (all of it)
    recipient: Literal["localpart", "address"] = "localpart"
    #: "+" makes bob+lists@example.org bob's mail (the part from the first such character is cut); "" = off
    recipient_delimiter: str = Field("", max_length=8)
    #: largest message accepted, in octets (advertised as SIZE, RFC 1870); larger ones get 552 5.3.4
    max_message_size: int = Field(50 * 1024 * 1024, ge=1024)
    #: recipients of one transaction; more get 452 4.5.3 and the MTA sends them in another (RFC 5321 §4.5.3.1.8)
    max_recipients: int = Field(100, ge=1)
    #: LMTP connections one worker serves at once; more hear 421 4.3.2 and are closed
    max_connections: int = Field(64, ge=1)
    #: seconds an MTA may stay silent (between commands, inside DATA) before the connection is closed
    timeout: float = Field(300.0, gt=0)
    #: prepend "Return-Path:" (the envelope sender) and "Received:" to each stored message
    trace_headers: bool = True


class Settings(BaseSettings):
    """The whole configuration. Build with `load_settings(path)`."""

    model_config = SettingsConfigDict(extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    poppassd: PoppassdSettings = Field(default_factory=PoppassdSettings)
    lmtp: LmtpSettings = Field(default_factory=LmtpSettings)

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        t = self.tls
        if (t.cert is None) != (t.key is None):
            raise ValueError("tls.cert and tls.key: set both or neither")
        if self.server.tls_listen and t.cert is None:
            raise ValueError("server.tls_listen needs tls.cert and tls.key")
        if self.poppassd.listen and t.cert is None:
            raise ValueError("poppassd.listen needs tls.cert and tls.key: poppassd runs over implicit TLS only")
        if "EXTERNAL" in self.auth.mechanisms and t.client_ca is None:
            raise ValueError("auth.mechanisms: EXTERNAL needs tls.client_ca (client certificates)")
        return self._migrate_expire()

    def _migrate_expire(self) -> Settings:
        """session.expire (the old key) feeds storage.expire_days, the one value the server reads."""
        old = self.session.expire
        if old is None:
            return self
        days: int | Literal["never"] = "never" if old == "NEVER" else int(old)
        if "expire_days" in self.storage.model_fields_set and self.storage.expire_days != days:
            raise ValueError(
                f"session.expire ({old}) and storage.expire_days ({self.storage.expire_days}) disagree: "
                "session.expire is deprecated, keep only storage.expire_days"
            )
        self.storage.expire_days = days
        logging.getLogger("pop3d").warning("session.expire is deprecated: use storage.expire_days = %s", days)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # POP3D_* variables are parsed by env_overrides (one-line errors naming the variable, unknown ones
        # refused), not by pydantic-settings' own source
        env = getattr(settings_cls, "__env__", None)
        if env is None:
            env = env_overrides(os.environ)
        sources: list[PydanticBaseSettingsSource] = [init_settings, InitSettingsSource(settings_cls, env.values)]
        toml_file = getattr(settings_cls, "__toml_path__", None)
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def _sections() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    for name, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        out[name] = model
    return out


#: section name -> its model, for naming keys outside pydantic (environment variables)
SECTIONS: Mapping[str, type[BaseModel]] = MappingProxyType(_sections())


class ConfigError(Exception):
    """A configuration problem, already phrased as one line naming the key (or the variable)."""


#: every environment variable pop3d reads starts with this; the configuration keys are POP3D_<SECTION>__<KEY>
ENV_PREFIX = "POP3D_"
#: the configuration file when a command is given no --config
CONFIG_FILE_VARIABLE = "POP3D_CONFIG_FILE"
#: POP3D_* variables that are not configuration keys (read by pop3d.cli), so not errors
NON_KEY_VARIABLES = frozenset({CONFIG_FILE_VARIABLE})


def add_config_option(parser: argparse.ArgumentParser, help: str = "") -> None:
    """`--config FILE` / `-c FILE` of a `pop3d` subcommand, defaulting to $POP3D_CONFIG_FILE."""
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=os.environ.get(CONFIG_FILE_VARIABLE) or None,
        help=help or f"TOML configuration file (default: ${CONFIG_FILE_VARIABLE})",
    )


@dataclass(frozen=True)
class EnvOverrides:
    """The POP3D_<SECTION>__<KEY> variables, parsed: values for the model, and which variable set each key."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (section, key) -> "NAME='value'", so a validation error can name the variable instead of the key alone
    origin: dict[tuple[str, str], str] = field(default_factory=dict)


def _suggest(word: str, choices: Iterable[str], template: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {template.format(close[0].upper())}?)" if close else ""


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _env_value(var: str, section: str, key: str, raw: str) -> Any:
    """The text of a variable as the model wants it: JSON for lists, None for an empty optional, else the string
    (pydantic converts it, and its error then names the key)."""
    info = SECTIONS[section].model_fields[key]
    if _is_list(info.annotation):
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, list):
            example = json.dumps(info.get_default(call_default_factory=True) or ["..."])
            raise ConfigError(f"{var}={raw!r}: {section}.{key} takes a JSON list, e.g. {var}='{example}'")
        return value
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):  # a nested table
        try:
            table = json.loads(raw)
        except ValueError:
            table = None
        if not isinstance(table, dict):
            raise ConfigError(f"{var}={raw!r}: {section}.{key} takes a JSON object, e.g. {var}='{{\"key\": 1}}'")
        return table
    if raw == "" and _is_optional(info.annotation):
        return None
    return raw


def env_overrides(environ: Mapping[str, str]) -> EnvOverrides:
    """Parse the POP3D_* variables of `environ`. A variable that names no key is an error, as an unknown key in
    the file is: `POP3D_SESION__TIMEOUT` must not be silently ignored. Raises ConfigError naming the variable."""
    out = EnvOverrides()
    problems: list[str] = []
    for var, raw in sorted(environ.items()):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_KEY_VARIABLES:
            continue
        section, sep, key = upper.removeprefix(ENV_PREFIX).lower().partition("__")
        if not sep or not key or "__" in key:
            problems.append(
                f"{var}: not a configuration variable (POP3D_<SECTION>__<KEY>, e.g. POP3D_SERVER__LISTEN)"
                + _suggest(section, SECTIONS, "POP3D_{}__...")
            )
            continue
        if section not in SECTIONS:
            hint = _suggest(section, SECTIONS, f"POP3D_{{}}__{key.upper()}")
            problems.append(f"{var}: unknown section {section!r}" + (hint or f" (sections: {', '.join(SECTIONS)})"))
            continue
        if key not in SECTIONS[section].model_fields:
            problems.append(
                f"{var}: unknown key {section}.{key}"
                + _suggest(key, SECTIONS[section].model_fields, f"POP3D_{section.upper()}__{{}}")
            )
            continue
        try:
            out.values.setdefault(section, {})[key] = _env_value(var, section, key, raw)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        out.origin[(section, key)] = f"{var}={raw!r}"
    if problems:
        more = len(problems) - 1
        raise ConfigError(problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""))
    return out


def _location(loc: tuple[int | str, ...]) -> str:
    """('server', 'listen', 0) -> 'server.listen[0]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _describe(exc: ValidationError, env: EnvOverrides) -> str:
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    key = _location(loc)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if not key:  # cross-key checks name their keys themselves
        return msg + tail
    variable = env.origin.get((str(loc[0]), str(loc[1]))) if len(loc) >= 2 else None
    if variable is not None:  # the variable echoes its value
        return f"{variable}: {key}: {msg}{tail}"
    value = first.get("input")
    if isinstance(value, str | int | float | bool) and first["type"] != "extra_forbidden":
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        msg += f" (got {shown})"
    return f"{key}: {msg}{tail}"


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Read the TOML file (if any), apply `POP3D_*` overrides from `environ` (default: the process environment),
    then `overrides`; validate. Raises ConfigError with one line naming the key or the variable."""
    env = env_overrides(os.environ if environ is None else environ)
    for section, values in overrides.items():  # keys the caller sets are not the variables' doing
        for key in values if isinstance(values, dict) else ():
            env.origin.pop((section, key), None)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found or not a regular file")
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"config file {p}: cannot read: {exc.strerror}") from None
    try:
        # a throw-away subclass carries the file path and the variables into settings_customise_sources
        attrs = {"__toml_path__": Path(path) if path is not None else None, "__env__": env}
        cls = type("Settings", (Settings,), attrs)
        settings: Settings = cls(**overrides)
        return settings
    except ValidationError as exc:
        raise ConfigError(_describe(exc, env)) from None
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {path}: {exc}") from None
