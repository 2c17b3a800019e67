# -*- test-case-name: tests.unit.test_config -*-
"""
Server endpoint strings (a listener's C{bind}, C{[metrics] bind}), checked before anything
binds.

Twisted's public C{serverFromString} builds an endpoint without listening on it, so given a
reactor that is never run it checks a string exactly as start-up will, endpoint plugins
included. Two things are done here instead:

 - A port out of range is noticed by Twisted only when it binds, so the port of C{tcp:},
   C{tcp6:} and C{ssl:} is checked here.
 - A C{systemd:} endpoint looks its socket up in what systemd passed (C{LISTEN_FDS}) as it
   is built, which a check run by hand, or before the socket unit started, does not have; so
   it is not built here, and its options are checked by hand, as Twisted's parser reads them.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IReactorCore,
    IReactorSocket,
    IReactorSSL,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
)
from zope.interface import implementer

__all__ = ["EndpointError", "check_server_endpoint", "split_description"]

#: The parameters of Twisted's C{systemd:} parser, in positional order.
_SYSTEMD_PARAMETERS = ("domain", "index", "name")
#: The address families Twisted's reactors can adopt a listening socket of.
_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")
_WITH_PORT = ("tcp", "tcp6", "ssl")


class EndpointError(ValueError):
    """What is wrong with an endpoint string, in one line."""


@implementer(IReactorCore, IReactorTime, IReactorTCP, IReactorUNIX, IReactorSSL, IReactorSocket)
class _NeverRun:
    """
    The reactor an endpoint is built with for the check: endpoints only keep their reactor
    until they listen, which this check never asks them to.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # zope.interface and copy probe for these
        raise EndpointError(f"the endpoint used the reactor ({name}) while being built")


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    An endpoint string's arguments and options, by Twisted's rules: C{:} separates them,
    C{key=value} (at the first C{=}) is an option, and a backslash takes the next character
    literally.

    @return: the arguments, the endpoint type first; the options.
    """
    arguments: list[str] = []
    options: dict[str, str] = {}
    pieces: list[str] = []
    current: list[str] = []
    separators = ":="
    characters = iter(description)
    for character in characters:
        if character == "\\":
            escaped = next(characters, None)
            if escaped is None:
                raise EndpointError("it ends with a lone backslash")
            current.append(escaped)
        elif character in separators:
            pieces.append("".join(current))
            current = []
            if character == ":":
                _add(pieces, arguments, options)
                pieces = []
                separators = ":="
            else:
                separators = ":"
        else:
            current.append(character)
    pieces.append("".join(current))
    _add(pieces, arguments, options)
    return arguments, options


def _add(pieces: list[str], arguments: list[str], options: dict[str, str]) -> None:
    if len(pieces) == 1:
        arguments.append(pieces[0])
    else:
        options[pieces[0]] = pieces[1]


def check_server_endpoint(description: str) -> None:
    """
    Check a server endpoint string without binding, adopting or opening anything.

    @raise EndpointError: saying what is wrong, in one line.
    """
    arguments, options = split_description(description)
    kind = arguments[0].lower() if arguments else ""
    if kind == "systemd":
        _check_systemd(arguments[1:], options)
        return
    if kind in _WITH_PORT:
        _check_port(arguments[1:], options)
    try:
        serverFromString(_NeverRun(), description)
    except EndpointError:
        raise
    except TypeError as e:
        problem = _arguments_problem(e)
        if "" in arguments[1:]:
            problem += " (a colon inside a value is written \\:)"
        raise EndpointError(problem) from None
    except Exception as e:
        raise EndpointError(_one_line(e)) from None


def _check_port(arguments: list[str], options: dict[str, str]) -> None:
    port = arguments[0] if arguments else options.get("port")
    if port is None:
        raise EndpointError("missing port")
    if not (port.isascii() and port.isdigit() and int(port) < 65536):
        raise EndpointError(f"port {port!r} is not a number from 0 to 65535")


def _check_systemd(arguments: list[str], options: dict[str, str]) -> None:
    if len(arguments) > len(_SYSTEMD_PARAMETERS):
        raise EndpointError("too many arguments")
    given = dict(zip(_SYSTEMD_PARAMETERS, arguments, strict=False))
    for key, value in options.items():
        if key not in _SYSTEMD_PARAMETERS:
            raise EndpointError(f"unknown option {key!r}")
        if key in given:
            raise EndpointError(f"{key!r} is given twice")
        given[key] = value
    domain = given.get("domain")
    if domain is None:
        raise EndpointError("missing domain (INET, INET6 or UNIX)")
    if domain not in _SYSTEMD_DOMAINS:
        raise EndpointError(f"domain {domain!r} is not INET, INET6 or UNIX")
    if ("index" in given) == ("name" in given):
        raise EndpointError("give exactly one of index (a number) or name (FileDescriptorName)")
    index = given.get("index")
    if index is not None and not (index.isascii() and index.isdigit()):
        raise EndpointError(f"index {index!r} is not a number")
    if given.get("name") == "":
        raise EndpointError("name is empty")


def _arguments_problem(error: TypeError) -> str:
    """Python's complaint about a parser's arguments, as a complaint about the string."""
    text = str(error)
    found = re.search(r"unexpected keyword argument '([^']*)'", text)
    if found:
        return f"unknown option {found[1]!r}"
    found = re.search(r"multiple values for (?:keyword )?argument '([^']*)'", text)
    if found:
        return f"{found[1]!r} is given twice"
    found = re.search(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.*)", text)
    if found:
        return f"missing {found[1]}"
    if "positional argument" in text:
        return "too many arguments"
    return _one_line(error)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    found = re.fullmatch(r"invalid literal for int\(\) with base \d+: (.*)", text)
    if found:
        return f"{found[1]} is not a number"
    return text or type(error).__name__
