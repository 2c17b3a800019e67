# -*- test-case-name: tests.unit.test_tls_reload -*-
"""
Certificate reload, all or nothing per listener: the certificate contexts of every TLS listener
a configuration reload keeps are rebuilt from their files; the session contexts (cache, ticket
keys) and established connections are kept, and a bad file keeps the old certificates and says
why. SIGHUP itself is L{persistproxy.reload.ConfigReloader}'s: one signal, one reload path.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from twisted.application.service import Service

from persistproxy.logs import EventLog
from persistproxy.tls.server import ServerTLS, TLSLoadError, _Certificate

__all__ = ["CertificateReloader"]


class CertificateReloader(Service):
    """
    Re-reads the certificates and keys of TLS listeners, when the configuration reloader
    asks, and warns about expired ones at start and at every reload.

    The reload reads a few small files synchronously, in the reactor thread, which is
    acceptable once per reload.
    """

    name = "tls-reloader"

    def __init__(self, listeners: Sequence[ServerTLS], log: EventLog) -> None:
        self._listeners = list(listeners)
        self._log = log

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # An expired certificate still loads (clients refuse it, not OpenSSL): say so at
        # start as at every reload, rather than only in the clients' errors.
        for tls in self._listeners:
            self._warn_expired(tls, tls.certificates)

    def reload(
        self, listeners: Sequence[ServerTLS] | None = None, new: Sequence[ServerTLS] = ()
    ) -> bool:
        """
        Reload the certificates of C{listeners} (by default those given last); L{True} when
        all of them succeeded. C{new} are contexts a reload just built from the files: only
        checked for expired certificates.
        """
        if listeners is not None:
            self._listeners = [*listeners, *new]
            reloaded: Sequence[ServerTLS] = listeners
        else:
            reloaded = self._listeners
        ok = True
        for tls in reloaded:
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
        for tls in new:
            self._warn_expired(tls, tls.certificates)
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
