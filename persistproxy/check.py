# -*- test-case-name: tests.unit.test_tap -*-
"""
What C{twistd persistproxy --check} says about a valid configuration, and the one check
that needs every listener at once: two listeners (or a listener and C{[metrics]}) bound to
the same address, which would otherwise pass validation and fail at start with "address in
use" after the first one is bound.

C{--check} prints a summary of what would run; C{--check --verbose} prints the effective
configuration, every default filled in, as a TOML file that loads to the same configuration
(like C{nginx -T}).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from persistproxy.config import ListenerConfig, ProxyConfig, UpstreamConfig
from persistproxy.errors import ConfigError
from persistproxy.net.endpoints import EndpointError, split_description
from persistproxy.net.sockopts import DEFAULT_BACKLOG, with_default_backlog

__all__ = ["address_conflicts", "check_addresses", "effective_toml", "summary"]

#: What an endpoint binds, for comparing two: C{("tcp", port, interface, v6)},
#: C{("unix", path)} or C{("systemd", domain, name)}.
Address = tuple[Any, ...]


def _address(description: str, base: str) -> Address | None:
    """
    What C{description} binds, or None for what cannot collide (port 0, unknown kinds).
    """
    try:
        arguments, keywords = split_description(description)
    except EndpointError:
        return None
    kind = arguments[0].strip().lower() if arguments else ""
    positional = arguments[1:]
    if kind in ("tcp", "tcp6", "ssl"):
        port_text = keywords.get("port", positional[0] if positional else "")
        if not port_text.isdigit() or int(port_text) == 0:
            return None
        v6 = kind == "tcp6"
        # tcp:PORT:INTERFACE may name the interface by position; ssl's next one is a key.
        by_position = positional[1] if kind != "ssl" and len(positional) > 1 else ""
        interface = keywords.get("interface", by_position)
        return ("tcp", int(port_text), interface or ("::" if v6 else "0.0.0.0"), v6)
    if kind == "unix":
        path = keywords.get("address", positional[0] if positional else "")
        return ("unix", str(Path(base or ".", path).absolute())) if path else None
    if kind == "systemd":
        name = keywords.get("name") or f"#{keywords.get('index', '')}"
        return ("systemd", keywords.get("domain", ""), name)
    return None


def _collide(a: Address, b: Address) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] != "tcp":
        return a == b
    if a[1] != b[1]:
        return False
    wild_a, wild_b = a[2] in ("0.0.0.0", "::"), b[2] in ("0.0.0.0", "::")
    if a[2] == "::" or b[2] == "::":
        return True  # IPv6's wildcard takes the port for IPv4 too (dual stack)
    if a[3] != b[3]:
        return False
    return wild_a or wild_b or a[2] == b[2]


def address_conflicts(config: ProxyConfig) -> list[tuple[str, str]]:
    """
    Pairs of keys (C{listener.NAME.bind}, C{metrics.bind}) whose endpoints would bind the
    same address: the same TCP port on the same or a wildcard interface, the same UNIX
    socket path, or the same systemd socket.
    """
    bound: list[tuple[str, Address]] = []
    keys = [(f"listener.{lc.name}.bind", lc.bind) for lc in config.listeners]
    if config.metrics_bind:
        keys.append(("metrics.bind", config.metrics_bind))
    conflicts = []
    for key, description in keys:
        address = _address(description, config.base)
        if address is None:
            continue
        for other_key, other in bound:
            if _collide(address, other):
                conflicts.append((key, other_key))
                break
        bound.append((key, address))
    return conflicts


def check_addresses(config: ProxyConfig) -> None:
    """
    @raise ConfigError: the first two keys that bind the same address, in one line.
    """
    for key, other in address_conflicts(config):
        raise ConfigError(f"{config.source}: {key}: the same address as {other}")


# -- the summary ---------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:g} s"


def _limit(value: int) -> str:
    return str(value) if value else "unlimited"


def _backlog(bind: str) -> str:
    if with_default_backlog(bind) != bind:
        return f"backlog {DEFAULT_BACKLOG}"
    options = split_description(bind)[1]
    if "backlog" in options:
        return f"backlog {options['backlog']}"
    return "backlog from systemd" if bind.lower().startswith("systemd:") else "default backlog"


def summary(config: ProxyConfig) -> Iterator[str]:
    """
    What would run, one line per listener, upstream, and the process-wide settings.
    """
    for lc in config.listeners:
        tls = ""
        if lc.tls is not None:
            n = len(lc.tls.get("certificates", ()))
            tls = f", TLS ({n} certificate{'s' if n != 1 else ''})"
        if lc.protocol == "http" and lc.tls is not None and "h2" in lc.tls.get("alpn", ()):
            tls += ", HTTP/2 by ALPN"
        elif lc.protocol == "http" and lc.extra.get("h2c"):
            tls += ", HTTP/2 with prior knowledge (h2c)"
        target = f", to upstream {lc.upstream}" if lc.upstream else ""
        yield (
            f"listener {lc.name}: {lc.protocol} on {lc.bind} ({_backlog(lc.bind)}){tls}"
            f"{target}; max_connections {_limit(lc.max_connections)}, keepalive_timeout "
            f"{_seconds(lc.keepalive_timeout)}, access_log {'on' if lc.access_log else 'off'}"
        )
    for up in config.upstreams.values():
        servers = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in up.servers)
        yield (
            f"upstream {up.name}: {servers}{' (TLS)' if up.tls else ''}; pool_size "
            f"{up.pool_size}, idle_timeout {_seconds(up.idle_timeout)}, max_connections "
            f"{_limit(up.max_connections)}"
        )
    if config.metrics_bind:
        yield f"metrics: {config.metrics_bind}: /metrics /healthz /readyz /status"
    else:
        yield "metrics: off ([metrics] bind is unset)"
    access = config.access_log_file or "stdout"
    yield (
        f"log: level {config.log_level}, format {config.log_format}, access lines to {access}; "
        f"drain_timeout {_seconds(config.drain_timeout)}"
    )
    if config.base:
        yield f"relative file names resolve against {config.base}"


# -- the effective configuration -------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    """A TOML value (strings as JSON writes them, which TOML reads the same)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


_LISTENER_OWN = {"tcp_keepalive", "tls", "extra"}


def _listener_lines(lc: ListenerConfig) -> Iterator[str]:
    yield "[[listener]]"
    for f in fields(ListenerConfig):
        if f.name in _LISTENER_OWN:
            continue
        value = getattr(lc, f.name)
        if f.name == "bind":
            value = with_default_backlog(value)
        yield f"{f.name} = {_value(value)}"
    for key, value in lc.extra.items():
        yield f"{_key(key)} = {_value(value)}"
    if lc.tcp_keepalive is not None:
        yield f"tcp_keepalive = {_value(lc.tcp_keepalive)}"
    if lc.tls is not None:
        yield ""
        yield "[listener.tls]"
        for key, value in lc.tls.items():
            yield f"{_key(key)} = {_value(value)}"


def _upstream_lines(up: UpstreamConfig) -> Iterator[str]:
    yield "[[upstream]]"
    for f in fields(UpstreamConfig):
        if f.name in ("weights", "backups"):
            continue  # part of servers
        value = getattr(up, f.name)
        if f.name == "health_check":
            if value is not None:
                items = ", ".join(
                    f"{k.name} = {_value(getattr(value, k.name))}" for k in fields(value)
                )
                yield f"health_check = {{ {items} }}"
            continue
        if f.name == "servers":
            addresses = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in value]
            if up.weights or up.backups:
                weights = up.weights or (1,) * len(addresses)
                backups = up.backups or (False,) * len(addresses)
                tables = [
                    f"{{ address = {_value(a)}, weight = {w}, backup = {_value(b)} }}"
                    for a, w, b in zip(addresses, weights, backups, strict=True)
                ]
                yield f"servers = [{', '.join(tables)}]"
                continue
            value = addresses
        yield f"{f.name} = {_value(value)}"


def effective_toml(config: ProxyConfig) -> str:
    """
    The configuration as it will run, every key present with its value, defaults included:
    a TOML document that loads to the same configuration. Relative file names appear as
    the absolute names they resolved to.
    """
    lines = [
        f"# persistproxy: the effective configuration of {config.source}",
        "# (every default filled in; relative file names resolved"
        + (f" against {config.base})" if config.base else ")"),
        f"drain_timeout = {_value(config.drain_timeout)}",
        "",
        "[log]",
        f"level = {_value(config.log_level)}",
        f"format = {_value(config.log_format)}",
        f"access_log = {_value(config.access_log_file or 'stdout')}",
        f"buffer_size = {_value(config.log_buffer_size)}",
        "",
    ]
    if config.metrics_bind:
        lines += ["[metrics]", f"bind = {_value(config.metrics_bind)}", ""]
    else:
        lines += ["# [metrics] bind is unset: no metrics listener", ""]
    for lc in config.listeners:
        lines += [*_listener_lines(lc), ""]
    for up in config.upstreams.values():
        lines += [*_upstream_lines(up), ""]
    return "\n".join(lines)
