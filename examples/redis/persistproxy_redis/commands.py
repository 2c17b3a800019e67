# -*- test-case-name: test_redis_plugin -*-
"""
What each Redis command does to the connection that carries it, which decides whether that
connection can go back to the pool after the command's reply.

Redis keeps state per connection: the selected database, the authenticated user, the client
name, a transaction, subscriptions, tracking. A command that creates such state on a pooled
connection would leak it to whichever client borrows the connection next, so those commands
I{pin} the connection to their client (see L{persistproxy_redis.session}). Everything not
listed here is stateless (GET, SET, INCR, EVAL, ...) and is sent on whatever pooled connection
the client is lent. Commands are classified by name (and subcommand, or an argument, for the
few whose effect depends on one), as Redis 7 defines them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BLOCKING",
    "CLIENT_RESET",
    "EXEC",
    "LOCAL",
    "MULTI",
    "NOPROTO",
    "NOT_SUPPORTED",
    "PLAIN",
    "PUBSUB",
    "QUIT",
    "RESOLVE",
    "STICKY",
    "TABLE",
    "UNSUPPORTED",
    "UNWATCH",
    "WATCH",
    "classify",
    "resolve",
]

#: No connection state: any pooled connection will do.
PLAIN: Final = 0
#: May wait for data (BLPOP, WAIT, XREAD ... BLOCK): no response timeout while it waits, and
#: a connection left with one outstanding is closed, not pooled (its reply comes later).
BLOCKING: Final = 1
#: Leaves state only RESET undoes (SELECT, AUTH, HELLO, CLIENT SETNAME, READONLY, ...): the
#: connection stays with its client until the client leaves, then is RESET and pooled.
STICKY: Final = 2
#: Starts a transaction; EXEC or DISCARD ends it, and with it the pin.
MULTI: Final = 3
#: Watches keys outside a transaction; EXEC, DISCARD or UNWATCH ends it.
WATCH: Final = 4
#: EXEC or DISCARD.
EXEC: Final = 5
#: UNWATCH.
UNWATCH: Final = 6
#: SUBSCRIBE and its kin: from here on the server pushes messages that answer no command, so
#: replies are no longer counted; the connection is closed when its client leaves.
PUBSUB: Final = 7
#: The client's own RESET: its connection's state ends (unless it subscribed).
CLIENT_RESET: Final = 8
#: Answered by the proxy itself (codes at or above this are never sent upstream).
LOCAL: Final = 16
#: Not supported: answered with L{NOT_SUPPORTED}.
UNSUPPORTED: Final = 16
#: QUIT: answered +OK, then the client connection is closed.
QUIT: Final = 17
#: HELLO asking for a protocol other than RESP2.
NOPROTO: Final = 18

#: The error an unsupported command gets.
NOT_SUPPORTED = b"-ERR persistproxy: command not supported by this proxy\r\n"

#: Codes at or above this are resolved by looking at the arguments (L{resolve}).
RESOLVE: Final = 32
_CLIENT = 32
_HELLO = 33
_XREAD = 34

#: Effect codes by upper-case command name; a name not here is L{PLAIN}.
TABLE: dict[bytes, int] = {
    # Blocking.
    b"BLPOP": BLOCKING,
    b"BRPOP": BLOCKING,
    b"BRPOPLPUSH": BLOCKING,
    b"BLMOVE": BLOCKING,
    b"BLMPOP": BLOCKING,
    b"BZPOPMIN": BLOCKING,
    b"BZPOPMAX": BLOCKING,
    b"BZMPOP": BLOCKING,
    b"WAIT": BLOCKING,
    b"WAITAOF": BLOCKING,
    b"XREAD": _XREAD,
    b"XREADGROUP": _XREAD,
    # Connection state that RESET undoes.
    b"SELECT": STICKY,
    b"AUTH": STICKY,
    b"HELLO": _HELLO,
    b"READONLY": STICKY,
    b"READWRITE": STICKY,
    b"ASKING": STICKY,
    b"CLIENT": _CLIENT,
    # Transactions.
    b"MULTI": MULTI,
    b"WATCH": WATCH,
    b"EXEC": EXEC,
    b"DISCARD": EXEC,
    b"UNWATCH": UNWATCH,
    # Pub/sub: (un)subscribing answers once per channel, and pushes follow.
    b"SUBSCRIBE": PUBSUB,
    b"PSUBSCRIBE": PUBSUB,
    b"SSUBSCRIBE": PUBSUB,
    b"UNSUBSCRIBE": PUBSUB,
    b"PUNSUBSCRIBE": PUBSUB,
    b"SUNSUBSCRIBE": PUBSUB,
    b"RESET": CLIENT_RESET,
    b"QUIT": QUIT,
    # A stream of pushes, or the connection turned into a replica's: never on a pooled
    # connection, and nothing a client of a proxy needs.
    b"MONITOR": UNSUPPORTED,
    b"SYNC": UNSUPPORTED,
    b"PSYNC": UNSUPPORTED,
    b"REPLCONF": UNSUPPORTED,
}

#: CLIENT subcommands that set or read state of this very connection.
_CLIENT_STICKY = frozenset(
    {
        b"SETNAME",
        b"SETINFO",
        b"TRACKING",
        b"CACHING",
        b"NO-EVICT",
        b"NO-TOUCH",
        b"ID",
        b"GETREDIR",
        b"TRACKINGINFO",
    }
)
#: CLIENT REPLY OFF/SKIP would make replies uncountable; KILL and UNBLOCK name server
#: connections by id or address, and a proxied client does not own the ones it would see.
_CLIENT_UNSUPPORTED = frozenset({b"REPLY", b"KILL", b"UNBLOCK"})


def classify(args: list[bytes]) -> int:
    """
    The effect code of the command C{args} (name first, as bytes, any case).
    """
    code = TABLE.get(args[0].upper(), PLAIN)
    return resolve(code, args) if code >= RESOLVE else code


def resolve(code: int, args: list[bytes]) -> int:
    """The effect of a command whose L{TABLE} code says it depends on its arguments."""
    if code == _CLIENT:
        sub = args[1].upper() if len(args) > 1 and isinstance(args[1], bytes) else b""
        if sub in _CLIENT_STICKY:
            return STICKY
        if sub in _CLIENT_UNSUPPORTED:
            return UNSUPPORTED
        return PLAIN
    if code == _HELLO:
        # HELLO [protover [AUTH user pass] [SETNAME name]]: RESP3 replies would not parse as
        # RESP2 at the client's end of a connection the proxy may hand to others.
        if len(args) > 1 and args[1] != b"2":
            return NOPROTO
        return STICKY
    # XREAD / XREADGROUP block only with a BLOCK argument.
    for arg in args[1:]:
        if isinstance(arg, bytes) and arg.upper() == b"BLOCK":
            return BLOCKING
    return PLAIN
