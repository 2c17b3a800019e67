# -*- test-case-name: tests.unit.test_reload -*-
"""
Reload in place on SIGHUP (C{systemctl reload}): the configuration file is read and validated
again, completely, and applied without a restart and without dropping a connection.

 - Invalid (what C{--check} would refuse): one C{config.reload_failed} line with the same
   text C{--check} prints, and nothing changes. So does a valid one that cannot be applied
   (a new port already in use).
 - Valid: L{persistproxy.service.ProxyService.reload} applies it (listeners bound, drained or
   switched, upstream groups swapped for new requests), then the certificates of the TLS
   listeners it kept are read again, and C{config.reloaded} says what changed.

The file is read and validated (certificate files and CA files included) on a thread of the
reactor's pool, so a slow disk does not stop traffic; applying it, and reading the few
certificate files of TLS listeners again, happens in the reactor thread (small files, once per
reload). Reloads never overlap: a signal during a reload runs one more reload after it.

The signal handler is one entry point; L{ConfigReloader.reload} is the other, for a supervisor
that would forward the signal to its workers in some other way.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from persistproxy.config import ConfigError, ProxyConfig
from persistproxy.logs import EventLog
from persistproxy.notify import SystemdNotifier
from persistproxy.service import ProxyService, ReloadError
from persistproxy.tls.reload import CertificateReloader
from persistproxy.tls.server import ServerTLS

__all__ = ["ConfigReloader"]

#: Reads and validates the configuration, off the reactor thread; fails with L{ConfigError}.
Loader = Callable[[], "Deferred[ProxyConfig]"]


class ConfigReloader(Service):
    """
    Owns SIGHUP: re-reads the configuration and applies it, or keeps the running one.

    @ivar last_error: why the last reload was refused (the C{--check} line), or C{""}.
    """

    name = "reloader"

    def __init__(
        self,
        reactor: Any,
        proxy: ProxyService,
        load: Loader | None,
        log: EventLog,
        certificates: CertificateReloader,
        notifier: SystemdNotifier | None = None,
        status: Callable[[], str] = lambda: "",
        signum: int = 0,
    ) -> None:
        """
        @param load: reads the configuration again; L{None} when there is no file (C{--demo}):
            then only certificates are reloaded.
        @param status: the C{STATUS=} text to send with C{READY=1} once a reload ended.
        """
        self._reactor = reactor
        self._proxy = proxy
        self._load = load
        self._log = log
        self._certificates = certificates
        self._notifier = notifier
        self._status = status
        self._signum = signum or signal.SIGHUP
        self._previous: Any = None
        self._busy = False
        #: Callers waiting for the reload that runs after the current one.
        self._queued: list[Deferred[bool]] | None = None
        self.last_error = ""

    def privilegedStartService(self) -> None:
        # Before the listeners bind (this service comes first): from the moment a listener
        # is announced, a SIGHUP must reload, not kill with the default action.
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._install()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._install()
        add_trigger = getattr(self._reactor, "addSystemEventTrigger", None)
        if add_trigger is not None:
            add_trigger("after", "shutdown", self.restore_signal)

    def stopService(self) -> None:
        # The handler stays while the proxy drains: a SIGHUP then is refused ("the proxy is
        # stopping"), where the default action would end the process in the middle of it.
        super().stopService()  # type: ignore[no-untyped-call]

    def restore_signal(self) -> None:
        """Give SIGHUP back to whoever had it (once the reactor has stopped)."""
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
            self._previous = None

    def _install(self) -> None:
        if self._previous is None:
            self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[bool]:
        """
        Reload now, or right after the reload under way; fires with whether the new
        configuration (and every certificate) was applied.
        """
        if self._busy:
            d: Deferred[bool] = Deferred()
            if self._queued is None:
                self._queued = []
            self._queued.append(d)
            return d
        self._busy = True
        return Deferred.fromCoroutine(self._run()).addBoth(self._ran)

    def _ran(self, result: Any) -> Any:
        self._busy = False
        queued, self._queued = self._queued, None
        if queued:

            def tell(outcome: bool) -> bool:
                for d in queued:
                    d.callback(outcome)
                return outcome

            self.reload().addCallback(tell)
        return result

    async def _run(self) -> bool:
        notifier = self._notifier
        if notifier is not None:
            notifier.reloading()
        try:
            return await self._reload()
        finally:
            if notifier is not None:
                notifier.ready(self._status())

    async def _reload(self) -> bool:
        proxy = self._proxy
        self._log.info("reload", config=proxy.config.source)
        if self._load is None:
            self._log.info("config.reload_skipped", reason="no configuration file (--demo)")
            return self._certificates.reload(_tls(proxy))
        if proxy.draining():
            self._refused("the proxy is stopping")
            return False
        try:
            config = await self._load()
        except ConfigError as e:
            self._refused(str(e))
            return False
        except Exception as e:
            # Not a configuration error: a bug in a validator, say. Still not a reason to stop.
            self._refused(f"{proxy.config.source}: {type(e).__name__}: {e}")
            return False
        try:
            summary = proxy.reload(config)
        except ReloadError as e:
            self._refused(f"{config.source}: {e}")
            return False
        except Exception as e:  # a bug: say so, and keep serving
            self._refused(f"{config.source}: cannot apply: {type(e).__name__}: {e}")
            return False
        self.last_error = ""
        self._log.info("config.reloaded", config=config.source, **summary.fields())
        if summary.restart_needed:
            self._log.warning(
                "config.restart_needed",
                keys=summary.restart_needed,
                kept="the values the process started with",
            )
        kept = summary.kept_tls
        new = [tls for tls in _tls(proxy) if all(tls is not k for k in kept)]
        return self._certificates.reload(kept, new)

    def _refused(self, error: str) -> None:
        # The very line --check prints, so the journal and the check agree.
        self.last_error = f"persistproxy: {error}"
        self._log.error(
            "config.reload_failed", error=self.last_error, kept="the running configuration"
        )


def _tls(proxy: ProxyService) -> list[ServerTLS]:
    return [listener.tls for listener in proxy.listeners if listener.tls is not None]
