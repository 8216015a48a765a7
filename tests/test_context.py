"""ServerContext and its factories: everything handed in, nothing looked up from globals or the environment."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from pop3d.auth import build_auth
from pop3d.auth.base import Authenticator, Credentials, User
from pop3d.auth.login_delay import LoginDelays
from pop3d.auth.passwd_file import PasswdFileAuthenticator
from pop3d.auth.penalty import Penalty
from pop3d.ops.metrics import Metrics, NullMetrics
from pop3d.pop3.context import ServerContext, SharedState, process_local
from pop3d.runtime.server import build_context
from pop3d.storage import build_storage
from pop3d.storage.base import MessageInfo


def test_build_auth_reads_the_configured_passwd_file(env):
    auth = build_auth(env.settings().auth)
    assert isinstance(auth, PasswdFileAuthenticator) and isinstance(auth, Authenticator)
    assert auth.path == env.passwd
    with pytest.raises(OSError, match="nope"):
        build_auth(env.settings(auth={"passwd_file": str(env.root / "nope")}).auth)


def test_build_context_uses_the_factories(env):
    ctx = build_context(env.settings())
    assert isinstance(ctx.auth, PasswdFileAuthenticator) and ctx.tls is None
    assert ctx.hostname == "test.invalid" and ctx.implementation.startswith("pop3d-")


async def test_reload_soon_is_a_no_op_unless_overridden():
    class Fixed(Authenticator):
        async def lookup(self, name: str) -> Credentials | None:
            return None

        async def verify(self, name: str, password: str) -> User | None:
            return None

    Fixed().reload_soon()  # declared on the interface: callers need no getattr probing
    assert await Fixed().verify("a", "b") is None
    with pytest.raises(TypeError):
        Authenticator()  # type: ignore[abstract]


def test_process_local_defaults(env):
    settings = env.settings(auth={"failure_delay": 1.5, "failure_delay_max": 3.0})
    state = process_local(settings)
    assert type(state.penalty) is Penalty and (state.penalty.base, state.penalty.maximum) == (1.5, 3.0)
    assert isinstance(state.login_delays, LoginDelays) and type(state.metrics) is NullMetrics
    on = process_local(env.settings(metrics={"listen": "127.0.0.1:0"}))
    assert isinstance(on.metrics, Metrics)
    assert on.metrics.registry.get_sample_value("pop3d_commands_total", {"verb": "STAT"}) == 0  # bound up front


def test_shared_state_is_used_as_given(env):
    settings = env.settings()
    state = SharedState(Penalty(1, 2), LoginDelays(), NullMetrics())
    ctx = ServerContext(settings, build_auth(settings.auth), build_storage(settings.storage), shared=state)
    assert (ctx.penalty, ctx.login_delays, ctx.metrics) == (state.penalty, state.login_delays, state.metrics)
    other = ServerContext(settings, ctx.auth, ctx.storage)
    assert other.penalty is not ctx.penalty  # each context without a SharedState has its own


def test_secure_networks_follow_the_current_settings(env):
    ctx = build_context(env.settings())
    assert ctx.is_secure_network("127.0.0.1") and ctx.is_secure_network("::ffff:127.0.0.1")
    assert not ctx.is_secure_network("192.0.2.1") and not ctx.is_secure_network("/run/pop3d.sock")
    ctx.settings = env.settings(auth={"secure_networks": ["192.0.2.0/24"]})  # what a reload does
    assert ctx.is_secure_network("192.0.2.1") and not ctx.is_secure_network("127.0.0.1")


def test_apop_timestamps_differ(env):
    ctx = build_context(env.settings())
    a, b = ctx.apop_timestamp(), ctx.apop_timestamp()
    assert a != b and a.startswith("<") and a.endswith("@test.invalid>")


@dataclass
class _Counters:
    top: int = 1
    top_bytes: int = 10
    retr: int = 2
    retr_bytes: int = 300
    dele: int = 1


@dataclass
class _Handler:
    """Anything with these attributes will do: the context does not import the session layer."""

    user: User | None = field(default_factory=lambda: User("alice"))
    peer: str = "192.0.2.5"
    end_reason: str = "QUIT"
    counters: _Counters = field(default_factory=_Counters)
    messages: list[MessageInfo] = field(default_factory=lambda: [MessageInfo(5, "a", "a"), MessageInfo(7, "b", "b")])
    tried: str | None = "alice"
    mech: str | None = "USER"
    auth_failures: int = 0

    def log_fields(self) -> dict[str, object]:
        return {"session": "abcdef1", "lip": "192.0.2.1:110", "tls": False, "mech": self.mech, "duration": 1.5}


def test_log_session_end(env, caplog):
    caplog.set_level(logging.INFO, logger="pop3d")
    build_context(env.settings()).log_session_end(_Handler())
    record = caplog.records[-1]
    assert "session end user=alice rip=192.0.2.5 reason=QUIT top=1/10, retr=2/300, del=1/2, size=12" in (
        record.getMessage()
    )
    assert record.fields == {
        "event": "session_end",
        "user": "alice",
        "rip": "192.0.2.5",
        "reason": "QUIT",
        "top": 1,
        "top_bytes": 10,
        "retr": 2,
        "retr_bytes": 300,
        "del": 1,
        "messages": 2,
        "size": 12,
        "session": "abcdef1",
        "lip": "192.0.2.1:110",
        "tls": False,
        "mech": "USER",
        "duration": 1.5,
        "health_check": False,
    }
