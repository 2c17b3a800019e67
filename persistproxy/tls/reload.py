# -*- test-case-name: tests.unit.test_tls_reload -*-
"""
Certificate reload on SIGHUP, all or nothing: the certificate contexts of every TLS listener
are rebuilt from their files; the session contexts (cache, ticket keys) and established
connections are kept, and a bad file keeps the old certificates and says why.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from twisted.application.service import Service

from persistproxy.logs import EventLog
from persistproxy.tls.server import ServerTLS, TLSLoadError, _Certificate

__all__ = ["CertificateReloader"]


class CertificateReloader(Service):
    """
    Re-reads the certificates and keys of every TLS listener on SIGHUP.

    The signal handler only schedules the reload on the reactor; the reload itself reads a
    few small files synchronously, which is acceptable once per signal. A listener whose new
    files cannot be used keeps its current certificates and says why.
    """

    name = "tls-reloader"

    def __init__(
        self, reactor: Any, listeners: Sequence[ServerTLS], log: EventLog, signum: int = 0
    ) -> None:
        self._reactor = reactor
        self._listeners = list(listeners)
        self._log = log
        self._signum = signum or signal.SIGHUP
        self._previous: Any = None

    def privilegedStartService(self) -> None:
        # Before the listeners bind (this service comes first): from the moment a listener
        # is announced, a SIGHUP must reload, not kill with the default action.
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        if self._previous is None:
            self._previous = signal.signal(self._signum, self._on_signal)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._previous is None:
            self._previous = signal.signal(self._signum, self._on_signal)
        # An expired certificate still loads (clients refuse it, not OpenSSL): say so at
        # start as at every reload, rather than only in the clients' errors.
        for tls in self._listeners:
            self._warn_expired(tls, tls.certificates)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Reload every listener's certificates; L{True} when all of them succeeded.
        """
        ok = True
        self._log.info("reload", tls_listeners=[tls.listener for tls in self._listeners])
        for tls in self._listeners:
            try:
                certificates = tls.reload()
            except TLSLoadError as e:
                ok = False
                self._log.error(
                    "tls.reload_failed",
                    listener=tls.listener,
                    file=e.path,
                    reason=e.reason,
                    kept="the certificates loaded before",
                )
                continue
            self._log.info(
                "tls.reloaded",
                listener=tls.listener,
                certificates=[c.cert_path for c in certificates],
            )
            self._warn_expired(tls, certificates)
        return ok

    def _warn_expired(self, tls: ServerTLS, certificates: Sequence[_Certificate]) -> None:
        now = datetime.now(UTC)
        for c in certificates:
            if c.not_after < now:
                self._log.warning(
                    "tls.certificate_expired",
                    listener=tls.listener,
                    file=c.cert_path,
                    not_after=c.not_after.isoformat(),
                )
