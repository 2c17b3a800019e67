# -*- test-case-name: tests.unit.test_tap -*-
"""
The twistd plugin's command line and service tree: C{twistd -n persistproxy --config FILE}.

Configuration is loaded and validated completely in L{Options.postOptions}, before twistd
daemonizes or binds anything; a problem ends the process with one line naming the file, the
key and the problem, and a non-zero exit status. So does a problem found at start (a port in
use): one line on standard error, naming the file and the key.

Where lines go: standard output by default (JSON lines, or lines for a person when it is a
terminal), or with twistd's C{--logfile FILE}, that file, for every line: ours, the access
lines (unless C{[log] access_log} names a file of their own) and Twisted's. A daemon
(C{twistd} without C{-n}) has no standard output, so it must be given C{--logfile}; it
refuses to start without one rather than lose every line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.plugin import getPlugins
from twisted.python import usage

from persistproxy import __version__
from persistproxy.config import ConfigError, ProxyConfig, load_config, parse_config
from persistproxy.errors import StartupError
from persistproxy.interfaces import IProtocolPlugin
from persistproxy.log_output import FileSink, LogOutput, LogReopener, stdout_output
from persistproxy.logs import AccessLog, EventLog, make_event_log, route_twisted_events
from persistproxy.net.selfcheck import self_check

__all__ = ["Options", "example_config", "makeService", "protocol_plugins"]


def protocol_plugins() -> dict[str, IProtocolPlugin]:
    """
    Every protocol plugin installed, by the name a listener uses.
    """
    import persistproxy.plugins

    return {p.name: p for p in getPlugins(IProtocolPlugin, persistproxy.plugins)}


def example_config() -> str:
    """
    The sample configuration (every key with its default), shipped in the package as
    C{persistproxy/example.toml} (copied from C{etc/persistproxy.toml} at build time), or read
    from C{etc/} when running from a source checkout.
    """
    packaged = resources.files("persistproxy").joinpath("example.toml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "etc" / "persistproxy.toml").read_text(
        encoding="utf-8"
    )


class Options(usage.Options):
    synopsis = "[--config FILE | --demo [--port N]] [--check [--verbose]] [--example-config]"
    longdesc = (
        "persistproxy: a reverse proxy with independent keep-alive on the client and "
        "upstream hops. --config names the TOML configuration (see etc/persistproxy.toml; "
        "--example-config prints it, every key with its default). Relative file names in "
        "it are relative to its directory. Run it in the foreground (twistd -n --pidfile= "
        "persistproxy ...); a daemon (no -n) needs twistd's --logfile, where every log "
        "line then goes."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        ["port", "p", 8080, "With --demo: the port to listen on (127.0.0.1).", int],
    ]
    optFlags = [
        ["demo", None, "Run on 127.0.0.1:8080 (or --port) in front of a built-in demo origin."],
        ["check", None, "Validate the configuration, say what would run, exit (like nginx -t)."],
        ["verbose", "v", "With --check: print the effective configuration, defaults included."],
        ["example-config", None, "Print the sample configuration (every key) and exit."],
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
        if self["example-config"]:
            sys.stdout.write(example_config())
            sys.exit(0)
        plugins = protocol_plugins()
        validators = {name: plugin.validate for name, plugin in plugins.items()}
        self.plugins = plugins
        self.proxy_config: ProxyConfig | None = None
        if self["config"] is None and not self["demo"]:
            _fail("persistproxy: --config FILE is required (or --demo to try it out)")
        if not 0 <= self["port"] < 65536:
            _fail(f"persistproxy: --port: expected 0 to 65535, got {self['port']}")
        from persistproxy.check import check_addresses

        try:
            if self["config"] is not None:
                self.proxy_config = config = load_config(self["config"], validators)
            else:
                # Validated here too, so that --demo --check proves the demo config is sound.
                config = parse_config(_demo_document(self["port"], 1), "<demo>", validators)
            check_addresses(config)
        except ConfigError as e:
            _fail(f"persistproxy: {e}")
        if self["check"]:
            _print_check(config, self["verbose"])
            sys.exit(0)
        self._twistd_logging(getattr(self, "parent", None))
        if "twisted.internet.reactor" not in sys.modules and sys.platform.startswith("linux"):
            # No reactor chosen with --reactor: use epoll without the per-event log context.
            from persistproxy.net.reactor import install

            install()

    def _twistd_logging(self, parent: Any) -> None:
        """
        Route Twisted's own events through our lines, and refuse a daemon that would lose
        every line (see the module docstring).
        """
        #: twistd's --logfile, where every line goes instead of standard output.
        self.log_file: str | None = None
        self.daemon = False
        if parent is None:
            return
        logfile = parent.get("logfile")
        if logfile not in (None, "-"):
            self.log_file = str(Path(logfile).absolute())
        self.daemon = not parent.get("nodaemon")
        if self.daemon and self.log_file is None:
            _fail(
                "persistproxy: twistd without -n (--nodaemon) needs --logfile=FILE: a daemon "
                "has no standard output, and every log line would be lost. Run it in the "
                "foreground (twistd -n --pidfile= persistproxy ..., as under systemd) or give "
                "--logfile, where every line then goes."
            )
        if not parent.get("logger") and not parent.get("syslog"):
            # Twisted's events in the same lines as ours (see route_twisted_events).
            parent["logger"] = "persistproxy.logs.twisted_observer"


def _fail(message: str) -> NoReturn:
    _exit(2, message)


def _exit(status: int, message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(status)


def _stderr(message: str) -> None:
    """
    C{message} on the process's real standard error: once twistd has begun logging,
    C{sys.stderr} is a logging shim whose lines would go to the log output instead.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(message + "\n")
    stream.flush()


def _print_check(config: ProxyConfig, verbose: bool) -> None:
    from persistproxy.check import effective_toml, summary

    print(f"persistproxy: {config.source}: configuration OK")
    for line in summary(config):
        print(f"  {line}")
    if verbose:
        print()
        print(effective_toml(config), end="")


def _demo_document(port: int, origin_port: int) -> dict[str, Any]:
    import tomllib

    from persistproxy.demo import DEMO_CONFIG

    return tomllib.loads(DEMO_CONFIG.format(port=port, origin_port=origin_port))


class _Root(MultiService):
    """
    The service tree's root: a problem found at start (L{StartupError}: a port in use) is
    the one line a configuration error is, naming the file, on standard error; the process
    ends with status 1. A daemon has no standard error: the line goes to its log file, and
    to twistd, which passes it to the parent process to print.
    """

    def __init__(self, source: str, daemon: bool, log: EventLog) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._source = source
        self._daemon = daemon
        self._log = log

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except StartupError as e:
            message = f"persistproxy: {self._source}: {e}"
            if self._daemon:
                self._log.error("start.failed", reason=f"{self._source}: {e}")
                raise RuntimeError(message) from None
            _stderr(message)
            sys.exit(1)


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
        config = parse_config(
            _demo_document(options["port"], demo_port.getHost().port), "<demo>", validators
        )
    log_file: str | None = getattr(options, "log_file", None)
    daemon: bool = getattr(options, "daemon", False)
    # Every line leaves through a LogOutput's writer thread: a stalled reader of stdout (a full
    # pipe, a busy journald) or a slow disk never blocks the reactor; see persistproxy.logs.
    files: list[LogOutput] = []
    if log_file is not None:
        main = LogOutput("logfile", _open_sink(log_file, "twistd --logfile", config))
        files.append(main)
    else:
        main = stdout_output()
    main.buffer_size = config.log_buffer_size
    terminal = log_file is None and os.isatty(1)
    console = config.log_format == "console" or (config.log_format == "auto" and terminal)
    route_twisted_events(main, config.log_level, console, colors=terminal)
    log = make_event_log(main, level=config.log_level, console=console, colors=terminal)
    # Before anything listens: the fast paths built below consult the probes' results.
    self_check(log, reactor)
    access_output = main
    if config.access_log_file:
        sink = _open_sink(config.access_log_file, "log.access_log", config)
        access_output = LogOutput("access_log", sink, config.log_buffer_size)
        files.append(access_output)
    outputs = [main, *files] if log_file is None else files
    root = _Root(config.source, daemon, log)
    # SIGUSR1 (logrotate's postrotate) reopens the log files; installed even without one,
    # so that the signal never kills the process.
    LogReopener(reactor, files, log).setServiceParent(root)  # type: ignore[no-untyped-call]
    from persistproxy.descriptors import ProcessDescriptors

    proxy = ProxyService(
        reactor,
        config,
        options.plugins,
        log,
        access_log=AccessLog(
            reactor, access_output, console=console and access_output is main, colors=terminal
        ),
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


def _open_sink(path: str, key: str, config: ProxyConfig) -> FileSink:
    try:
        return FileSink(path)
    except OSError as e:
        _exit(1, f"persistproxy: {config.source}: {key}: cannot open {e.filename}: {e.strerror}")
