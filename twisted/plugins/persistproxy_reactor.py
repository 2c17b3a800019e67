"""
C{twistd -r persistproxy}: the epoll reactor without per-event logging context.
"""

from twisted.application.reactors import Reactor

persistproxy_reactor = Reactor(
    "persistproxy",
    "persistproxy.net.reactor",
    "epoll without the legacy per-event logging context (Linux).",
)
