# -*- test-case-name: tests.unit.test_plugins -*-
"""
The interfaces a protocol plugin implements and the narrow context it is given.

A third-party protocol depends on this module only. It is found with Twisted's plugin system
(C{getPlugins(IProtocolPlugin, persistproxy.plugins)}), so a package that drops a module into
any C{persistproxy/plugins/} directory on C{sys.path} adds a protocol that listeners can name
with C{protocol = "<name>"}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocolFactory

    from persistproxy.config import ListenerConfig

__all__ = ["IProtocolPlugin", "IProxyContext"]


class IProxyContext(Interface):
    """
    What the proxy lends a plugin to build a listener's protocol: no more than that, so a
    plugin can be tested with a stand-in and does not depend on the rest of the config.
    """

    reactor = Attribute("The reactor (IReactorCore, IReactorTime, IReactorTCP) to use.")
    log = Attribute("A structlog logger that writes the proxy's JSON lines.")
    access_log = Attribute(
        "A L{persistproxy.logs.AccessLog}: C{log(record)} writes one access line (batched)."
    )

    def upstream(name: str) -> object:
        """
        The L{persistproxy.upstream.group.UpstreamGroup} called C{name}: its servers and pools.
        """

    def limits(listener: str) -> object:
        """
        The L{persistproxy.listener.limits.ConnectionLimits} of a listener (total, per-client and
        idle-per-client limits): call C{admit(host)} in C{buildProtocol} and C{release(host)}
        when the connection closes.
        """

    def stats(listener: str) -> object:
        """
        The L{persistproxy.metrics.ListenerStats} of a listener, for its counters.
        """

    def register_connection(listener: str, connection: object) -> None:
        """
        Make an open connection known to graceful drain; it must provide C{close_if_idle()}
        and be unregistered with L{unregister_connection} when it closes. If the drain
        timeout expires while it is still open, its C{drain_cut()} is called if it has one
        (to account for work cut short), else its transport is aborted.
        """

    def unregister_connection(listener: str, connection: object) -> None:
        """
        Forget a connection registered with L{register_connection}.
        """

    def draining() -> bool:
        """
        Whether the proxy is shutting down gracefully (answer with C{Connection: close}).
        """


class IProtocolPlugin(Interface):
    """
    A protocol that a C{[[listener]]} can speak.
    """

    name = Attribute("The value of the listener's C{protocol} key, e.g. C{'http'}.")

    def validate(listener: ListenerConfig) -> None:
        """
        Check the listener's keys that belong to this protocol (C{listener.extra} holds the
        keys the core does not know). Raise L{persistproxy.config.ConfigError} with
        C{"<key>: <problem>"} for the first bad one; the core adds the file and table.
        """

    def build_factory(listener: ListenerConfig, context: IProxyContext) -> IProtocolFactory:
        """
        The factory whose protocols serve the listener's accepted connections. Called once
        per listener at start-up; never blocks.
        """
