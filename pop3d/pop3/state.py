"""The POP3 session states and their transitions, as data (RFC 1939 §3-6).

Sans-IO, like pop3d.pop3.protocol: one table says which (state, event) pairs are legal and where they lead;
anything not in it is a bug in the caller and raises, rather than leaving a session in a state the RFC
does not have. The handler (pop3d.pop3.handlers) is the only caller; the parser reads the state to refuse
verbs that are illegal in it.
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.Enum):
    """RFC 1939 §3 session states, plus CLOSED once the session is over (with or without UPDATE)."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


class SessionEvent(enum.Enum):
    """What moves a session from one state to the next."""

    LOGIN_OK = "LOGIN_OK"  # USER/PASS, APOP or AUTH succeeded and the maildrop is locked
    QUIT = "QUIT"
    COMMITTED = "COMMITTED"  # the UPDATE state's commit ended (done or failed): the session is over
    DISCONNECT = "DISCONNECT"  # the connection ended without QUIT: drop, autologout, shutdown


class IllegalTransition(RuntimeError):
    """A (state, event) pair the table does not allow: a programming error, never a client error."""


A, T, U, C = State.AUTHORIZATION, State.TRANSACTION, State.UPDATE, State.CLOSED

#: (state, event) -> next state. Everything absent is illegal.
TRANSITIONS: Final[dict[tuple[State, SessionEvent], State]] = {
    (A, SessionEvent.LOGIN_OK): T,  # RFC 1939 §4: the maildrop is acquired, TRANSACTION begins
    (A, SessionEvent.QUIT): C,  # RFC 1939 §5 QUIT: from AUTHORIZATION the session ends without UPDATE
    (T, SessionEvent.QUIT): U,  # RFC 1939 §6: QUIT from TRANSACTION enters UPDATE
    (U, SessionEvent.COMMITTED): C,  # RFC 1939 §6: after the commit the connection closes
    # RFC 1939 §6: a session that ends for any other reason never enters UPDATE, so nothing is deleted.
    # There is no (UPDATE, DISCONNECT): a commit is never interrupted, the session waits for it.
    (A, SessionEvent.DISCONNECT): C,
    (T, SessionEvent.DISCONNECT): C,
    (C, SessionEvent.DISCONNECT): C,  # the end of a session that already said goodbye
}


def next_state(state: State, event: SessionEvent) -> State:
    """The state after `event`; IllegalTransition when the table has no such pair."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed in state {state.value}") from None
