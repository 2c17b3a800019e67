# -*- test-case-name: tests.unit.test_tap -*-
"""
The twistd plugin's command line and service tree: C{twistd -n persistproxy --config FILE}.

Configuration is loaded and validated completely in L{Options.postOptions}, before twistd
daemonizes or binds anything; a problem ends the process with one line naming the file, the
key and the problem, and a non-zero exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.plugin import getPlugins
from twisted.python import usage

from persistproxy import __version__
from persistproxy.config import ConfigError, ProxyConfig, load_config, parse_config
from persistproxy.interfaces import IProtocolPlugin
from persistproxy.logs import (
    AccessLog,
    FileSink,
    LogOutput,
    LogReopener,
    make_event_log,
    stdout_output,
)
from persistproxy.net.selfcheck import self_check

__all__ = ["Options", "makeService", "protocol_plugins"]


def protocol_plugins() -> dict[str, IProtocolPlugin]:
    """
    Every protocol plugin installed, by the name a listener uses.
    """
    import persistproxy.plugins

    return {p.name: p for p in getPlugins(IProtocolPlugin, persistproxy.plugins)}


class Options(usage.Options):
    synopsis = "[--config FILE | --demo] [--check]"
    longdesc = (
        "persistproxy: a reverse proxy with independent keep-alive on the client and "
        "upstream hops. --config names the TOML configuration (see etc/persistproxy.toml)."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
    ]
    optFlags = [
        ["demo", None, "Run on 127.0.0.1:8080 in front of a built-in demo origin."],
        ["check", None, "Validate the configuration and exit (0 when valid), like nginx -t."],
        ["version", None, "Print the version and exit."],
        ["list-protocols", None, "Print each installed listener protocol and exit."],
    ]

    def opt_version(self) -> None:
        print(f"persistproxy {__version__}")
        sys.exit(0)

    def opt_list_protocols(self) -> None:
        """
        Print each installed protocol plugin (what a listener's C{protocol} may name) with
        its one-line description, and exit: no configuration is needed.
        """
        plugins = protocol_plugins()
        width = max((len(name) for name in plugins), default=0)
        for name in sorted(plugins):
            print(f"{name:<{width}}  {plugins[name].description}")
        sys.exit(0)

    def postOptions(self) -> None:
        plugins = protocol_plugins()
        validators = {name: plugin.validate for name, plugin in plugins.items()}
        self.plugins = plugins
        self.proxy_config: ProxyConfig | None = None
        if self["config"] is None and not self["demo"]:
            _fail("persistproxy: --config FILE is required (or --demo to try it out)")
        if self["config"] is not None:
            try:
                self.proxy_config = load_config(self["config"], validators)
            except ConfigError as e:
                _fail(f"persistproxy: {e}")
        elif self["demo"]:
            # Validated here too, so that --demo --check proves the demo config is sound.
            parse_config(_demo_document(8080, 1), "<demo>", validators)
        if self["check"]:
            config = self.proxy_config
            what = "<demo>" if config is None else config.source
            print(f"persistproxy: {what}: configuration OK")
            sys.exit(0)
        if "twisted.internet.reactor" not in sys.modules and sys.platform.startswith("linux"):
            # No reactor chosen with --reactor: use epoll without the per-event log context.
            from persistproxy.net.reactor import install

            install()
        parent = getattr(self, "parent", None)
        if (
            parent is not None
            and not parent.get("logger")
            and parent.get("logfile")
            in (
                None,
                "-",
            )
        ):
            # Twisted's own events in the same JSON lines as ours.
            parent["logger"] = "persistproxy.logs.twisted_observer"


def _fail(message: str) -> None:
    _exit(2, message)


def _exit(status: int, message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(status)


def _demo_document(port: int, origin_port: int) -> dict[str, Any]:
    import tomllib

    from persistproxy.demo import DEMO_CONFIG

    return tomllib.loads(DEMO_CONFIG.format(port=port, origin_port=origin_port))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from persistproxy.service import ProxyService

    config = options.proxy_config
    demo_port: Any = None
    if config is None:
        from persistproxy.demo import demo_site

        # The demo origin binds an ephemeral port now, so the proxy's config can name it.
        demo_port = reactor.listenTCP(0, demo_site(), interface="127.0.0.1")  # type: ignore[attr-defined, arg-type]
        validators = {name: p.validate for name, p in options.plugins.items()}
        config = parse_config(_demo_document(8080, demo_port.getHost().port), "<demo>", validators)
    # Every line leaves through a LogOutput's writer thread: a stalled reader of stdout (a full
    # pipe, a busy journald) or a slow disk never blocks the reactor; see persistproxy.logs.
    stdout = stdout_output()
    stdout.buffer_size = config.log_buffer_size
    log = make_event_log(stdout, level=config.log_level)
    # Before anything listens: the fast paths built below consult the probes' results.
    self_check(log, reactor)
    access_output = stdout
    files: list[LogOutput] = []
    if config.access_log_file:
        try:
            sink = FileSink(config.access_log_file)
        except OSError as e:
            _exit(1, f"persistproxy: [log] access_log: cannot open {e.filename}: {e.strerror}")
        access_output = LogOutput("access_log", sink, config.log_buffer_size)
        files.append(access_output)
    outputs = [stdout, *files]
    root = MultiService()
    # SIGUSR1 (logrotate's postrotate) reopens the access log file; installed even without
    # one, so that the signal never kills the process.
    LogReopener(reactor, files, log).setServiceParent(root)  # type: ignore[no-untyped-call]
    from persistproxy.descriptors import ProcessDescriptors

    proxy = ProxyService(
        reactor,
        config,
        options.plugins,
        log,
        access_log=AccessLog(reactor, access_output),
        process=ProcessDescriptors(),
    )
    from persistproxy.notify import NotifyService, SystemdNotifier
    from persistproxy.reload import ConfigReloader
    from persistproxy.tls.reload import CertificateReloader

    tls = [listener.tls for listener in proxy.listeners if listener.tls is not None]
    certificates = CertificateReloader(tls, log)
    certificates.setServiceParent(root)  # type: ignore[no-untyped-call]
    notifier = SystemdNotifier(log)
    # SIGHUP (systemctl reload) reloads the configuration in place, and the TLS listeners'
    # certificates with it. Its handler is installed before the listeners bind, so that a
    # reload never kills the process.
    reloader = ConfigReloader(
        reactor,
        proxy,
        _loader(reactor, options) if options["config"] is not None else None,
        log,
        certificates,
        notifier,
        lambda: _status(proxy, reloader),
    )
    reloader.setServiceParent(root)  # type: ignore[no-untyped-call]
    proxy.setServiceParent(root)  # type: ignore[no-untyped-call]
    if config.metrics_bind:
        from persistproxy.metrics_service import metrics_service

        metrics = metrics_service(reactor, config.metrics_bind, proxy, log, outputs)
        metrics.setServiceParent(root)  # type: ignore[attr-defined]
    # Last: READY=1 once everything above is bound, and (services stop in reverse order)
    # STOPPING=1 as the drain begins.
    NotifyService(reactor, notifier, lambda: _status(proxy, reloader)).setServiceParent(root)  # type: ignore[no-untyped-call]
    if demo_port is not None:
        log.info("demo.origin", port=demo_port.getHost().port)
    return root


def _loader(reactor: Any, options: Options) -> Callable[[], Deferred[ProxyConfig]]:
    """
    Reads and validates the configuration file again on a thread of the reactor's pool, as
    C{--check} would: the file, certificate files and CA files are read there, not in the
    reactor thread.
    """
    from twisted.internet.threads import deferToThreadPool

    path = options["config"]
    validators = {name: p.validate for name, p in options.plugins.items()}

    def load() -> Deferred[ProxyConfig]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), load_config, path, validators)

    return load


def _status(proxy: Any, reloader: Any) -> str:
    """The C{STATUS=} line C{systemctl status} shows."""
    text = (
        f"{proxy.open_connections()} connections open, {proxy.requests_total()} requests received"
    )
    if reloader.last_error:
        text += f"; last reload refused: {reloader.last_error}"
    return text
