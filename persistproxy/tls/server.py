# -*- test-case-name: tests.unit.test_tls -*-
"""
TLS termination on a listener: certificates chosen by SNI, ALPN, and session resumption that
actually works.

Twisted's C{CertificateOptions} turns the session cache and tickets off, and even with the
cache on OpenSSL drops a session whose client closed without a close_notify (most HTTP
clients), so a naive listener resumes nothing. Here (the connections themselves are
L{persistproxy.tls.transport}'s):

 - One I{session context} per listener is built once, at start-up, and every connection is
   created from it: OpenSSL keeps the session cache and the ticket keys in the context a
   connection was created from (C{SSL_CTX} C{session_ctx}), so one long-lived context means
   every connection can resume every other one's session, whichever certificate SNI picked.
   It holds no certificate; its server-name callback always switches the connection to one
   of the I{certificate contexts} (also built once), the first certificate when no name
   matches or none was sent. All contexts share one session-id context.
 - The session of a client that just closes the socket is kept: the transport
   (L{persistproxy.tls.transport}) marks such a connection shut down before OpenSSL frees
   it, and C{OP_IGNORE_UNEXPECTED_EOF} does the same for code that hands OpenSSL the end of
   the stream. TLS then no longer tells a truncated stream from a finished one; HTTP framing
   does (Content-Length and chunked bodies are checked by the HTTP parser, and a connection
   lost in the middle of a request body aborts that request upstream).
 - On SIGHUP (L{CertificateReloader}) only the certificate contexts are rebuilt from the
   files; the session context, so the cache and ticket keys, stays. Connections already
   established keep the context they have.

Session caches and ticket keys live in the process: several persistproxy processes behind
one address resume only the sessions they issued themselves (see docs/tls.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL

from persistproxy.net.selfcheck import usable

__all__ = [
    "ListenerTLSSettings",
    "ServerTLS",
    "TLSLoadError",
    "parse_listener_tls",
    "session_reused",
]

try:  # pyOpenSSL has no accessor for SSL_session_reused; its cffi binding of OpenSSL has it.
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a future pyOpenSSL without the private module
    _lib = None

#: Not in every pyOpenSSL; the value is OpenSSL's since 3.0.
OP_IGNORE_UNEXPECTED_EOF: int = getattr(SSL, "OP_IGNORE_UNEXPECTED_EOF", 1 << 7)

VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

#: TLS 1.2 suites: forward secret AEAD only (Mozilla's "intermediate" without DHE, which
#: would need DH parameters). TLS 1.3 suites are OpenSSL's defaults, all modern.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    | OP_IGNORE_UNEXPECTED_EOF
)

#: ALPN names an HTTP listener must not offer: the client would then speak a protocol it does
#: not (HTTP/2 is offered as "h2"; "h2c" is cleartext only, RFC 9113 3.1; h3 is QUIC's).
_NOT_HTTP = {"h2c", "h3"}

_SETTINGS_KEYS = {
    "certificates",
    "min_version",
    "alpn",
    "session_cache",
    "session_tickets",
    "session_timeout",
}


_SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


class TLSLoadError(Exception):
    """
    A certificate or key file that cannot be used, phrased for one log or error line.

    @ivar index: which entry of C{certificates}; @ivar which: C{"cert"} or C{"key"}.
    """

    def __init__(self, index: int, which: str, path: str, reason: str) -> None:
        super().__init__(f"cannot load {path}: {reason}")
        self.index = index
        self.which = which
        self.path = path
        self.reason = reason

    @property
    def key(self) -> str:
        """The config key at fault, e.g. C{certificates[0].cert}."""
        return f"certificates[{self.index}].{self.which}"


@dataclass(frozen=True)
class ListenerTLSSettings:
    """
    A validated C{[listener.tls]} table; certificate paths are absolute.
    """

    certificates: tuple[tuple[str, str], ...]
    min_version: str = "TLSv1.2"
    alpn: tuple[str, ...] = ("http/1.1",)
    session_cache: bool = True
    session_tickets: bool = True
    session_timeout: int = 3600

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> ListenerTLSSettings:
        """From the mapping L{parse_listener_tls} made (what C{ListenerConfig.tls} holds)."""
        return cls(
            certificates=tuple((c["cert"], c["key"]) for c in table["certificates"]),
            min_version=table.get("min_version", _DEFAULTS["min_version"]),
            alpn=tuple(table.get("alpn", _DEFAULTS["alpn"])),
            session_cache=table.get("session_cache", _DEFAULTS["session_cache"]),
            session_tickets=table.get("session_tickets", _DEFAULTS["session_tickets"]),
            session_timeout=table.get("session_timeout", _DEFAULTS["session_timeout"]),
        )


#: Each key's default, written once (in the class above).
_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(ListenerTLSSettings) if f.default is not MISSING
}


# -- configuration ----------------------------------------------------------------------------


def parse_listener_tls(
    table: Mapping[str, Any],
    fail: Callable[[str, str], Exception],
    base: Path,
    protocol: str = "http",
) -> dict[str, Any]:
    """
    Check a C{[listener.tls]} table completely, loading every certificate and key, so that
    C{--check} catches a bad file and nothing binds with one.

    @param fail: makes the one-line error for C{(key, problem)}; the caller adds the file
        and the table path.
    @param base: relative certificate paths are relative to this (the directory twistd
        starts in). Paths are made absolute now, without resolving symbolic links, so a
        reload reads the same files and follows a link moved to a renewed certificate.
    @return: the normalised table, for C{ListenerConfig.tls}.
    """
    for key in table:
        if key not in _SETTINGS_KEYS:
            raise fail(key, "unknown key")

    def typed(key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        value = table.get(key, default)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise fail(key, f"expected {what}, got {value!r}")
        return value

    raw = table.get("certificates")
    if raw is None:
        raise fail("certificates", "required key is missing")
    if not isinstance(raw, list) or not raw:
        raise fail("certificates", f"expected a non-empty list of {{ cert, key }}, got {raw!r}")
    certificates = []
    for i, entry in enumerate(raw):
        where = f"certificates[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, f"expected a table {{ cert = ..., key = ... }}, got {entry!r}")
        for key in entry:
            if key not in ("cert", "key"):
                raise fail(f"{where}.{key}", "unknown key")
        paths = {}
        for which in ("cert", "key"):
            value = entry.get(which)
            if value is None:
                raise fail(f"{where}.{which}", "required key is missing")
            if not isinstance(value, str) or not value:
                raise fail(f"{where}.{which}", f"expected a file name, got {value!r}")
            paths[which] = os.path.abspath(base / value)
        certificates.append(paths)
    min_version = typed("min_version", (str,), "a string", _DEFAULTS["min_version"])
    if min_version not in VERSIONS:
        raise fail("min_version", f"expected TLSv1.2 or TLSv1.3, got {min_version!r}")
    alpn = typed("alpn", (list,), "a list of protocol names", list(_DEFAULTS["alpn"]))
    for name in alpn:
        if not isinstance(name, str) or not name or len(name.encode()) > 255:
            raise fail("alpn", f"expected protocol names such as 'http/1.1', got {name!r}")
        if protocol == "http" and name in _NOT_HTTP:
            raise fail("alpn", f"{name!r} is not a protocol this listener speaks over TLS")
    timeout = typed(
        "session_timeout", (int,), "a whole number of seconds", _DEFAULTS["session_timeout"]
    )
    if timeout < 1:
        raise fail("session_timeout", f"must be >= 1, got {timeout}")
    result = {
        "certificates": certificates,
        "min_version": min_version,
        "alpn": list(alpn),
        "session_cache": typed(
            "session_cache", (bool,), "true or false", _DEFAULTS["session_cache"]
        ),
        "session_tickets": typed(
            "session_tickets", (bool,), "true or false", _DEFAULTS["session_tickets"]
        ),
        "session_timeout": timeout,
    }
    try:
        ServerTLS(ListenerTLSSettings.from_mapping(result), "check")
    except TLSLoadError as e:
        raise fail(e.key, str(e)) from None
    return result


# -- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Certificate:
    """One certificate/key pair, ready to serve, and the names SNI selects it by."""

    context: SSL.Context
    names: tuple[str, ...]
    cert_path: str
    not_after: datetime


def _read(index: int, which: str, path: str) -> bytes:
    # A small synchronous read: at start-up, or on SIGHUP between two reactor events.
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSLoadError(index, which, path, e.strerror or str(e)) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _load_pair(
    index: int, cert_path: str, key_path: str
) -> tuple[list[x509.Certificate], _SigningKey]:
    data = _read(index, "cert", cert_path)
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSLoadError(
            index, "cert", cert_path, f"not a PEM certificate ({_first_line(e)})"
        ) from None
    key_data = _read(index, "key", key_path)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TLSLoadError(
            index, "key", key_path, "the key is encrypted (no passphrase support)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSLoadError(
            index, "key", key_path, f"not a PEM private key ({_first_line(e)})"
        ) from None
    if not isinstance(key, _SIGNING_KEYS):
        raise TLSLoadError(index, "key", key_path, f"unusable key type {type(key).__name__}")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TLSLoadError(
            index, "key", key_path, f"the key does not match the certificate in {cert_path}"
        )
    return chain, key


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is for: its SAN, else (old certificates) its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [
            str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    return tuple(n.lower().rstrip(".") for n in names)


class _CertificateSet:
    """
    The certificate contexts of a listener and the SNI lookup over them, replaced whole on
    reload so a handshake never sees half of an old set and half of a new one.
    """

    def __init__(self, certificates: list[_Certificate]) -> None:
        self.certificates = certificates
        self.default = certificates[0].context
        self.exact: dict[bytes, SSL.Context] = {}
        self.wildcard: dict[bytes, SSL.Context] = {}
        # Earlier certificates win a name both carry, as the first is the default.
        for certificate in reversed(certificates):
            for name in certificate.names:
                if name.startswith("*."):
                    self.wildcard[name[2:].encode("idna")] = certificate.context
                else:
                    self.exact[name.encode("idna")] = certificate.context

    def select(self, server_name: bytes | None) -> SSL.Context:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(b".")
        context = self.exact.get(name)
        if context is not None:
            return context
        # A wildcard covers exactly one label.
        return self.wildcard.get(name.partition(b".")[2], self.default)


# -- the listener's TLS -----------------------------------------------------------------------


class ServerTLS:
    """
    Makes the C{SSL.Connection} of every accepted connection of one listener, from contexts
    built once (see the module docstring for why that matters).

    @ivar session_context: the context every connection is created from; holds the session
        cache and the ticket keys, and outlives certificate reloads.
    """

    def __init__(self, settings: ListenerTLSSettings, listener: str) -> None:
        self.settings = settings
        self.listener = listener
        # Stable per listener: the value only has to be the same on every context.
        self._session_id_context = hashlib.sha256(f"persistproxy/{listener}".encode()).digest()
        self._alpn = [name.encode() for name in settings.alpn]
        self.session_context = self._context()
        self.session_context.set_tlsext_servername_callback(self._on_server_name)
        self._set = self._load()

    # -- connections

    def new_connection(self) -> SSL.Connection:
        """A server-side connection for one client, from the session context."""
        connection = SSL.Connection(self.session_context, None)
        connection.set_accept_state()
        return connection

    # -- certificates

    @property
    def certificates(self) -> list[_Certificate]:
        return self._set.certificates

    def context_for(self, server_name: bytes | None) -> SSL.Context:
        """The certificate context a ClientHello naming C{server_name} gets."""
        return self._set.select(server_name)

    def reload(self) -> list[_Certificate]:
        """
        Re-read every certificate and key; all or nothing.

        @raise TLSLoadError: with the first file that cannot be used; nothing changed then.
        """
        self._set = self._load()
        return self._set.certificates

    def _load(self) -> _CertificateSet:
        certificates = []
        for index, (cert_path, key_path) in enumerate(self.settings.certificates):
            chain, key = _load_pair(index, cert_path, key_path)
            context = self._context()
            try:
                context.use_certificate(chain[0])
                for extra in chain[1:]:
                    context.add_extra_chain_cert(extra)
                context.use_privatekey(key)
                context.check_privatekey()
            except SSL.Error as e:
                raise TLSLoadError(index, "cert", cert_path, ssl_error_text(e)) from None
            certificates.append(
                _Certificate(context, _names(chain[0]), cert_path, chain[0].not_valid_after_utc)
            )
        return _CertificateSet(certificates)

    def _context(self) -> SSL.Context:
        settings = self.settings
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(VERSIONS[settings.min_version])
        options = _OPTIONS
        if not settings.session_tickets:
            options |= SSL.OP_NO_TICKET
        context.set_options(options)
        # Frees a connection's 34 KiB of read/write buffers while it is idle: kept-alive
        # connections are mostly idle.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.set_cipher_list(TLS12_CIPHERS)
        context.set_session_id(self._session_id_context)
        context.set_session_cache_mode(
            SSL.SESS_CACHE_SERVER if settings.session_cache else SSL.SESS_CACHE_OFF
        )
        context.set_timeout(settings.session_timeout)
        if self._alpn:
            context.set_alpn_select_callback(self._select_alpn)
        return context

    def _on_server_name(self, connection: SSL.Connection) -> None:
        # OpenSSL calls this for every ClientHello, with or without a server name.
        connection.set_context(self._set.select(connection.get_servername()))

    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        for name in self._alpn:
            if name in offered:
                # Kept on the connection: the handshake report reads it from there, which
                # is cheaper than asking OpenSSL (see tls_transport.alpn_selected).
                connection.set_app_data(name)
                return name
        # Go on without ALPN rather than fail the handshake: the client may still speak
        # HTTP/1.1, as it would to a server that does not know ALPN.
        return SSL.NO_OVERLAPPING_PROTOCOLS


def ssl_error_text(error: SSL.Error) -> str:
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return "; ".join(p for p in parts if p) or _first_line(error)


def session_reused(connection: SSL.Connection) -> bool:
    """
    Whether the handshake resumed a session (C{SSL_session_reused}; pyOpenSSL has no method
    for it, so its cffi binding is called directly). Always false if the self-check found
    the binding or C{Connection._ssl} changed (L{persistproxy.net.selfcheck}).
    """
    return usable("tls.binding") and _session_reused(connection)


def _session_reused(connection: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(connection._ssl))


# -- SIGHUP -----------------------------------------------------------------------------------
