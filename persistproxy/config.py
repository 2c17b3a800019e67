# -*- test-case-name: tests.unit.test_config -*-
"""
Loading and validating the TOML configuration.

The file is read once, checked completely and turned into frozen objects before anything
binds a port, so the process never starts half-configured. Every problem is reported as a
single line naming the file, the key and what is wrong, which is what an operator reading a
journal needs.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from persistproxy.errors import ConfigError
from persistproxy.tls.server import parse_listener_tls
from persistproxy.tls.trust import load_trust_root

__all__ = [
    "BALANCE_METHODS",
    "ConfigError",
    "HealthCheckConfig",
    "ListenerConfig",
    "ProxyConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True)
class HealthCheckConfig:
    """
    An upstream's C{health_check} table: a probe every C{interval} seconds, failed if not
    done within C{timeout}; C{rise} successes in a row bring a server that is down back,
    C{fall} failures in a row take one that is up out. HTTP probes C{GET path} and want the
    status C{expect}; a C{tcp} upstream's probe is a connect.
    """

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    expect: int = 200


@dataclass(frozen=True)
class UpstreamConfig:
    """
    One named group of origin servers and how connections to them are kept.
    """

    name: str
    servers: tuple[tuple[str, int], ...]
    pool_size: int = 256
    idle_timeout: float = 60.0
    max_requests: int = 1000
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    keepalive_margin: float = 1.0
    idle_learn_window: float = 60.0
    assumed_idle_limit: float = 1.0
    max_connections: int = 0
    queue_size: int = 1024
    queue_timeout: float = 10.0
    max_header_count: int = 100
    tls: bool = False
    tls_verify: bool = True
    tls_ca: str = ""
    tls_server_name: str = ""
    #: "v1" or "v2": each connection starts with a PROXY protocol header naming the client it
    #: serves (and is then never lent to another client); "" sends none.
    send_proxy_protocol: str = ""
    #: Passive health (nginx's meaning): this many failed connects within fail_timeout
    #: seconds take a server out of the rotation for fail_timeout seconds; 0 = never.
    max_fails: int = 1
    fail_timeout: float = 10.0
    #: How a server is chosen: one of L{BALANCE_METHODS}.
    balance: str = "round_robin"
    #: Each server's weight, in the order of C{servers}; empty means 1 each.
    weights: tuple[int, ...] = ()
    #: Whether each server is a backup (used only while no other is up); empty: none is.
    backups: tuple[bool, ...] = ()
    #: Active health checks; none unless the table is given.
    health_check: HealthCheckConfig | None = None


#: The values of an upstream's C{balance}.
BALANCE_METHODS = ("round_robin", "least_conn", "ip_hash", "random_two")

#: Who may send a PROXY protocol header by default: this host only (see README, "PROXY
#: protocol": HAProxy's accept-proxy trusts whoever connects; here the senders are named).
DEFAULT_PROXY_PROTOCOL_FROM = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class ListenerConfig:
    """
    One listening endpoint and the policy of the client connections it accepts.

    ``extra`` keeps keys that belong to the listener's protocol plugin (for example a TCP
    plugin's own settings) so plugins can validate them without this module knowing them.
    """

    name: str
    bind: str
    protocol: str = "http"
    upstream: str = ""
    keepalive_timeout: float = 75.0
    max_requests: int = 1000
    max_head_size: int = 16384
    max_header_count: int = 100
    max_body_size: int = 0
    min_chunk_size: int = 16
    add_via: bool = True
    add_forwarded: bool = True
    access_log: bool = True
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    min_body_rate: int = 0
    min_body_rate_window: float = 10.0
    min_send_rate: int = 0
    min_send_rate_window: float = 10.0
    max_lifetime: float = 0.0
    max_connections: int = 10000
    max_connections_per_client: int = 0
    max_idle_per_client: int = 0
    send_408_on_idle: bool = False
    tcp_keepalive: Mapping[str, int] | None = None
    tls: Mapping[str, Any] | None = None
    #: A byte relay (a tcp listener; HTTP's tunnels later) idle both ways this long is closed.
    tunnel_idle_timeout: float = 3600.0
    #: Every connection starts with a PROXY protocol header (v1 or v2), read before TLS and
    #: admission; its address is the client's.
    proxy_protocol: bool = False
    #: The networks whose connections may send that header (others are closed at accept).
    proxy_protocol_from: tuple[str, ...] = DEFAULT_PROXY_PROTOCOL_FROM
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyConfig:
    """
    The whole, validated configuration of one persistproxy process.
    """

    listeners: tuple[ListenerConfig, ...]
    upstreams: Mapping[str, UpstreamConfig]
    log_level: str = "info"
    #: The file access lines are appended to; "" for standard output, with the other events.
    access_log_file: str = ""
    #: Bytes of lines each log output holds while its destination does not take them.
    log_buffer_size: int = 1024 * 1024
    #: "auto" (for a person on a terminal, JSON otherwise), "json" or "console".
    log_format: str = "auto"
    #: Seconds an access line may wait in the buffer before it is written (0: at the end of
    #: the event loop's turn).
    access_log_flush: float = 0.5
    metrics_bind: str = ""
    drain_timeout: float = 30.0
    source: str = "<built-in>"
    #: The directory relative file names were resolved against: the file's own.
    base: str = ""


#: A getter's default when none is given: the config dataclass's field default.
_FROM_DATACLASS: Any = object()


def _defaults(cls: type) -> dict[str, Any]:
    """The field defaults of a config dataclass, by key."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


class _Section:
    """
    Typed access to one table of the file, recording which keys were used so that
    unknown keys can be reported by name.
    """

    def __init__(
        self,
        source: str,
        path: str,
        table: Mapping[str, Any],
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """
        @param defaults: each key's default (a config dataclass's fields, see L{_defaults}),
            used where a getter is given none: a default is written once, in the dataclass.
        """
        self._source = source
        self._path = path
        self._table = table
        self._defaults = defaults or {}
        self._used: set[str] = set()

    def _default(self, key: str, given: Any) -> Any:
        return self._defaults[key] if given is _FROM_DATACLASS else given

    def fail(self, key: str, problem: str) -> ConfigError:
        where = f"{self._path}.{key}" if self._path else key
        return ConfigError(f"{self._source}: {where}: {problem}")

    def _get(self, key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        self._used.add(key)
        if key not in self._table:
            return default
        value = self._table[key]
        # bool is an int subclass; a boolean is never a valid number here.
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(key, f"expected {what}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(key, f"expected {what}, got {value!r}")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        value = self._get(key, (str,), "a string", default)
        if value is None:
            raise self.fail(key, "required key is missing")
        return str(value)

    def boolean(self, key: str, default: Any = _FROM_DATACLASS) -> bool:
        return bool(self._get(key, (bool,), "true or false", self._default(key, default)))

    def integer(self, key: str, default: Any = _FROM_DATACLASS, minimum: int = 0) -> int:
        value = int(self._get(key, (int,), "an integer", self._default(key, default)))
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def seconds(self, key: str, default: Any = _FROM_DATACLASS) -> float:
        value = float(
            self._get(key, (int, float), "a number of seconds", self._default(key, default))
        )
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number of seconds, got {value}")
        if value < 0:
            raise self.fail(key, f"must be >= 0, got {value:g}")
        return value

    def table(self, key: str) -> Mapping[str, Any] | None:
        return self._get(key, (dict,), "a table", None)  # type: ignore[no-any-return]

    def string_list(self, key: str) -> list[str]:
        value = self._get(key, (list,), "a list of strings", None)
        if value is None:
            raise self.fail(key, "required key is missing")
        if not value or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"expected a non-empty list of strings, got {value!r}")
        return list(value)

    def unused(self) -> dict[str, Any]:
        return {k: v for k, v in self._table.items() if k not in self._used}

    def reject_unknown(self) -> None:
        for key in self._table:
            if key not in self._used:
                raise self.fail(key, "unknown key")


def _parse_hostport(section: _Section, key: str, text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if (
        not sep
        or not host
        or "/" in host
        or "@" in host
        or not port_text.isdigit()
        or not 0 < int(port_text) < 65536
    ):
        raise section.fail(key, f"expected host:port, got {text!r}")
    return host, int(port_text)


def _health_check(s: _Section) -> HealthCheckConfig | None:
    table = s.table("health_check")
    if table is None:
        return None
    t = _Section(s._source, f"{s._path}.health_check", table)
    result = HealthCheckConfig(
        path=t.string("path", "/healthz"),
        interval=t.seconds("interval", 5.0),
        timeout=t.seconds("timeout", 2.0),
        rise=t.integer("rise", 2, 1),
        fall=t.integer("fall", 3, 1),
        expect=t.integer("expect", 200, 100),
    )
    t.reject_unknown()
    if not result.path.startswith("/") or any(c in result.path for c in " \r\n"):
        raise t.fail("path", f"expected an absolute path without spaces, got {result.path!r}")
    if result.interval <= 0 or result.timeout <= 0:
        key = "interval" if result.interval <= 0 else "timeout"
        raise t.fail(key, "must be > 0")
    if result.expect > 599:
        raise t.fail("expect", f"expected an HTTP status (100-599), got {result.expect}")
    return result


def _servers(
    s: _Section,
) -> tuple[tuple[tuple[str, int], ...], tuple[int, ...], tuple[bool, ...]]:
    """
    An upstream's C{servers}: each a C{"host:port"} string or a table
    C{{ address = "host:port", weight = 1, backup = false }}; returns the addresses, the
    weights and the backup flags, in order.
    """
    value = s._get("servers", (list,), "a list of servers", None)
    if value is None:
        raise s.fail("servers", "required key is missing")
    if not value:
        raise s.fail("servers", "expected a non-empty list of servers")
    addresses = []
    weights = []
    backups = []
    for i, entry in enumerate(value):
        key = f"servers[{i}]"
        if isinstance(entry, str):
            addresses.append(_parse_hostport(s, "servers", entry))
            weights.append(1)
            backups.append(False)
            continue
        if not isinstance(entry, dict):
            raise s.fail(key, f'expected "host:port" or a table with address, got {entry!r}')
        t = _Section(s._source, f"{s._path}.{key}", entry)
        addresses.append(_parse_hostport(t, "address", t.string("address")))
        weights.append(t.integer("weight", 1, 1))
        backups.append(t.boolean("backup", False))
        t.reject_unknown()
    if all(backups):
        raise s.fail("servers", "every server is a backup: at least one must not be")
    return tuple(addresses), tuple(weights), tuple(backups)


def _check_endpoint(section: _Section, key: str, description: str) -> None:
    """
    Check a Twisted server endpoint string without binding it, so a typo is a config error
    and not a traceback after half of the listeners are already up.
    """
    from persistproxy.net.endpoints import EndpointError, check_server_endpoint

    try:
        check_server_endpoint(description)
    except EndpointError as e:
        raise section.fail(key, f"bad endpoint {description!r}: {e}") from None


def _upstream(source: str, index: int, table: Any, base: Path) -> UpstreamConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: upstream[{index}]: expected a table")
    s = _Section(source, f"upstream[{index}]", table)
    name = s.string("name")
    s = _Section(source, f"upstream.{name}", table, _defaults(UpstreamConfig))
    s.string("name")
    servers, weights, backups = _servers(s)
    balance = s.string("balance", "round_robin")
    if balance not in BALANCE_METHODS:
        raise s.fail("balance", f"expected one of {', '.join(BALANCE_METHODS)}, got {balance!r}")
    result = UpstreamConfig(
        name=name,
        servers=servers,
        balance=balance,
        weights=weights if any(w != 1 for w in weights) else (),
        backups=backups if any(backups) else (),
        pool_size=s.integer("pool_size"),
        idle_timeout=s.seconds("idle_timeout"),
        max_requests=s.integer("max_requests"),
        connect_timeout=s.seconds("connect_timeout"),
        response_timeout=s.seconds("response_timeout"),
        read_timeout=s.seconds("read_timeout"),
        write_timeout=s.seconds("write_timeout"),
        keepalive_margin=s.seconds("keepalive_margin"),
        idle_learn_window=s.seconds("idle_learn_window"),
        assumed_idle_limit=s.seconds("assumed_idle_limit"),
        max_connections=s.integer("max_connections"),
        queue_size=s.integer("queue_size"),
        queue_timeout=s.seconds("queue_timeout"),
        max_header_count=s.integer("max_header_count", minimum=1),
        tls=s.boolean("tls"),
        tls_verify=s.boolean("tls_verify"),
        tls_ca=_tls_ca(s, base),
        tls_server_name=s.string("tls_server_name", ""),
        send_proxy_protocol=_send_proxy_protocol(s),
        max_fails=s.integer("max_fails"),
        fail_timeout=s.seconds("fail_timeout"),
        health_check=_health_check(s),
    )
    s.reject_unknown()
    if result.idle_timeout <= 0:
        raise s.fail("idle_timeout", "must be > 0: a pooled connection must be kept a while")
    if not result.tls:
        # Someone who names a CA or a server name means TLS; with tls off the requests
        # would go in plain text, silently. (Defaults, as in the sample file, are fine.)
        for key in ("tls_ca", "tls_server_name"):
            if getattr(result, key):
                raise s.fail(key, "set, but tls is false: set tls = true, or remove it")
    return result


def _send_proxy_protocol(s: _Section) -> str:
    """C{"v1"}, C{"v2"}, or off: C{false} or C{""} (the default, as C{--check --verbose} says)."""
    value = s._get("send_proxy_protocol", (str, bool), '"v1" or "v2"', False)
    if value is False or value == "":
        return ""
    if value not in ("v1", "v2"):
        raise s.fail("send_proxy_protocol", f'expected "v1" or "v2", got {value!r}')
    return str(value)


def _proxy_protocol_from(s: _Section, enabled: bool) -> tuple[str, ...]:
    """
    The CIDRs allowed to send a PROXY protocol header, each checked (a bare address is one
    host). Others than the default without C{proxy_protocol = true} are a mistake worth
    saying: whoever wrote them expects the header to be read.
    """
    if "proxy_protocol_from" not in s._table:
        return DEFAULT_PROXY_PROTOCOL_FROM
    networks = []
    for text in s.string_list("proxy_protocol_from"):
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise s.fail(
                "proxy_protocol_from", f"{text!r} is not an IP network (as 10.0.0.0/8 or ::1)"
            ) from None
    if not enabled and tuple(networks) != DEFAULT_PROXY_PROTOCOL_FROM:
        raise s.fail("proxy_protocol_from", "set, but proxy_protocol is false")
    return tuple(networks)


def _tls_ca(s: _Section, base: Path) -> str:
    """
    The upstream CA file, checked now so that C{--check} catches it; made absolute (a
    relative name is relative to C{base}, the configuration file's directory).
    """
    path = s.string("tls_ca", "")
    if not path:
        return ""
    full = str(base / path)
    try:
        load_trust_root(full)
    except OSError as e:
        raise s.fail("tls_ca", f"cannot load {full}: {e.strerror}") from None
    except ValueError as e:
        raise s.fail("tls_ca", f"cannot load {full}: {e}") from None
    return full


_PluginValidator = Callable[[ListenerConfig], None]


def _listener_tls(
    s: _Section, source: str, name: str, protocol: str, base: Path
) -> Mapping[str, Any] | None:
    """
    Check C{[listener.tls]} now, certificate files included (see L{persistproxy.tls.server}).
    """
    table = s.table("tls")
    if table is None:
        return None
    # Relative file names are relative to the configuration file's directory, as tls_ca's.
    ts = _Section(source, f"listener.{name}.tls", table)
    return parse_listener_tls(table, ts.fail, base, protocol)


def _listener(
    source: str,
    index: int,
    table: Any,
    upstreams: Mapping[str, UpstreamConfig],
    protocols: Mapping[str, _PluginValidator] | None,
    base: Path,
) -> ListenerConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: listener[{index}]: expected a table")
    s = _Section(source, f"listener[{index}]", table)
    name = s.string("name", f"listener{index}")
    s = _Section(source, f"listener.{name}", table, _defaults(ListenerConfig))
    s.string("name", name)
    bind = s.string("bind")
    _check_endpoint(s, "bind", bind)
    protocol = s.string("protocol", _defaults(ListenerConfig)["protocol"])
    upstream = s.string("upstream", "")
    if upstream and upstream not in upstreams:
        raise s.fail("upstream", f"no [[upstream]] is named {upstream!r}")
    tcp_keepalive = s.table("tcp_keepalive")
    if tcp_keepalive is not None:
        ks = _Section(source, f"listener.{name}.tcp_keepalive", tcp_keepalive)
        tcp_keepalive = {
            "idle": ks.integer("idle", 7200, 1),
            "interval": ks.integer("interval", 75, 1),
            "count": ks.integer("count", 10, 1),
        }
        ks.reject_unknown()
    proxy_protocol = s.boolean("proxy_protocol")
    listener = ListenerConfig(
        name=name,
        bind=bind,
        protocol=protocol,
        upstream=upstream,
        keepalive_timeout=s.seconds("keepalive_timeout"),
        max_requests=s.integer("max_requests"),
        max_head_size=s.integer("max_head_size", minimum=256),
        max_header_count=s.integer("max_header_count", minimum=1),
        max_body_size=s.integer("max_body_size"),
        min_chunk_size=s.integer("min_chunk_size"),
        add_via=s.boolean("add_via"),
        add_forwarded=s.boolean("add_forwarded"),
        access_log=s.boolean("access_log"),
        header_timeout=s.seconds("header_timeout"),
        body_timeout=s.seconds("body_timeout"),
        send_timeout=s.seconds("send_timeout"),
        min_body_rate=s.integer("min_body_rate"),
        min_body_rate_window=_rate_window(s, "min_body_rate_window"),
        min_send_rate=s.integer("min_send_rate"),
        min_send_rate_window=_rate_window(s, "min_send_rate_window"),
        max_lifetime=s.seconds("max_lifetime"),
        max_connections=s.integer("max_connections"),
        max_connections_per_client=s.integer("max_connections_per_client"),
        max_idle_per_client=s.integer("max_idle_per_client"),
        send_408_on_idle=s.boolean("send_408_on_idle"),
        tcp_keepalive=tcp_keepalive,
        tls=_listener_tls(s, source, name, protocol, base),
        tunnel_idle_timeout=s.seconds("tunnel_idle_timeout"),
        proxy_protocol=proxy_protocol,
        proxy_protocol_from=_proxy_protocol_from(s, proxy_protocol),
        extra=s.unused(),
    )
    if listener.proxy_protocol and not listener.header_timeout:
        raise s.fail(
            "header_timeout", "must be > 0 with proxy_protocol = true: it bounds the header's wait"
        )
    if protocols is not None:
        if protocol not in protocols:
            known = ", ".join(sorted(protocols))
            raise s.fail("protocol", f"unknown protocol {protocol!r} (known: {known})")
        try:
            protocols[protocol](listener)
        except ConfigError as e:
            raise ConfigError(f"{source}: listener.{name}.{e}") from None
    elif listener.extra:
        s.reject_unknown()
    return listener


def _rate_window(s: _Section, key: str) -> float:
    """
    The seconds a minimum rate is averaged over: a rate needs some time to be measured, so
    not 0 (whether the rate itself is set or not, so that setting it later cannot fail).
    """
    value = s.seconds(key)
    if value <= 0:
        raise s.fail(key, f"must be > 0, got {value:g}: a rate is averaged over some time")
    return value


def _access_log_file(s: _Section, base: Path) -> str:
    """
    C{[log] access_log}: C{"stdout"} (""), or a file made absolute (relative to the
    configuration file's directory, as C{tls_ca}), whose directory must exist so that
    C{--check} catches a typo; the file itself is opened (created) at start.
    """
    value = s.string("access_log", "stdout")
    if value == "stdout":
        return ""
    if not value:
        raise s.fail("access_log", 'expected "stdout" or a file name, got ""')
    path = base / value
    try:
        if path.is_dir():
            raise s.fail("access_log", f"{path} is a directory")
        if not path.parent.is_dir():
            raise s.fail("access_log", f"directory {path.parent} does not exist")
    except OSError as e:
        raise s.fail("access_log", f"{path}: {e.strerror}") from None
    return str(path)


_TOP_KEYS = {"listener", "upstream", "log", "metrics", "drain_timeout"}


def parse_config(
    document: Mapping[str, Any],
    source: str = "<built-in>",
    protocols: Mapping[str, _PluginValidator] | None = None,
    base: str | Path | None = None,
) -> ProxyConfig:
    """
    Validate a decoded TOML document.

    @param protocols: the validator of each known listener protocol, by name. A validator
        raises L{ConfigError} with C{"key: problem"} for a key of its own it dislikes and
        rejects keys it does not know. With L{None}, only the built-in keys are accepted.
    @param base: the directory relative file names (certificates, C{tls_ca}, C{[log]
        access_log}) are relative to: the file's own (L{load_config}); the working
        directory if not given. Names are made absolute, without resolving links.
    """
    # Lexically normalised (".." folded), not resolved: a link in the path stays a link.
    root = Path(os.path.normpath(Path(base if base is not None else ".").absolute()))
    top = _Section(source, "", document)
    for key in document:
        if key not in _TOP_KEYS:
            raise top.fail(key, "unknown key")
    raw_upstreams = top._get("upstream", (list,), "an array of tables [[upstream]]", [])
    upstreams: dict[str, UpstreamConfig] = {}
    for i, table in enumerate(raw_upstreams):
        up = _upstream(source, i, table, root)
        if up.name in upstreams:
            raise ConfigError(f"{source}: upstream[{i}].name: duplicate name {up.name!r}")
        upstreams[up.name] = up
    raw_listeners = top._get("listener", (list,), "an array of tables [[listener]]", None)
    if not raw_listeners:
        raise top.fail("listener", "at least one [[listener]] is required")
    listeners: list[ListenerConfig] = []
    for i, table in enumerate(raw_listeners):
        lc = _listener(source, i, table, upstreams, protocols, root)
        if any(other.name == lc.name for other in listeners):
            raise ConfigError(f"{source}: listener[{i}].name: duplicate name {lc.name!r}")
        listeners.append(lc)
    log = _Section(source, "log", top.table("log") or {})
    log_level = log.string("level", _defaults(ProxyConfig)["log_level"])
    if log_level not in ("debug", "info", "warning", "error"):
        raise log.fail("level", f"expected debug, info, warning or error, got {log_level!r}")
    access_log_file = _access_log_file(log, root)
    log_buffer_size = log.integer("buffer_size", _defaults(ProxyConfig)["log_buffer_size"], 65536)
    log_format = log.string("format", _defaults(ProxyConfig)["log_format"])
    if log_format not in ("auto", "json", "console"):
        raise log.fail("format", f"expected auto, json or console, got {log_format!r}")
    access_log_flush = log.seconds("access_flush", 0.5)
    log.reject_unknown()
    metrics = _Section(source, "metrics", top.table("metrics") or {})
    metrics_bind = metrics.string("bind", _defaults(ProxyConfig)["metrics_bind"])
    if metrics_bind:
        _check_endpoint(metrics, "bind", metrics_bind)
    metrics.reject_unknown()
    return ProxyConfig(
        listeners=tuple(listeners),
        upstreams=upstreams,
        log_level=log_level,
        access_log_file=access_log_file,
        log_buffer_size=log_buffer_size,
        log_format=log_format,
        access_log_flush=access_log_flush,
        metrics_bind=metrics_bind,
        drain_timeout=top.seconds("drain_timeout", _defaults(ProxyConfig)["drain_timeout"]),
        source=source,
        base=str(root),
    )


def load_config(
    path: str | Path, protocols: Mapping[str, _PluginValidator] | None = None
) -> ProxyConfig:
    """
    Read and validate a TOML file; every failure is a one-line L{ConfigError}. Relative
    file names in it are relative to its directory, wherever twistd is started.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return parse_config(document, source, protocols, Path(path).absolute().parent)
