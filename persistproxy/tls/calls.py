# -*- test-case-name: tests.unit.test_tls_transport -*-
"""
The per-record OpenSSL calls of the TLS transport: feed received bytes in, take decrypted
records out, encrypt, and take what is to be sent out.

pyOpenSSL's methods for these allocate a fresh buffer per call (64 KiB for a C{bio_read}),
wrap the data in a context manager, and report "nothing more to read" by raising
C{WantReadError}, which a server meets at the end of every read. A resumed connection makes
about ten such calls. L{BindingCalls} makes the same C calls through pyOpenSSL's own cffi
binding (the one its methods use) into one reusable buffer, and answers "nothing more" with
a value. Errors still go through pyOpenSSL, so exceptions, including those raised inside
OpenSSL callbacks such as ALPN selection, are exactly pyOpenSSL's. L{PublicCalls} is the
same through pyOpenSSL's public methods, used when the start-up self-check
(L{persistproxy.net.selfcheck}) finds that the binding or the private attributes used here
changed: it makes a handshake and carries a record each way through both.
"""

from __future__ import annotations

from OpenSSL import SSL

from persistproxy.net.selfcheck import usable

__all__ = ["BindingCalls", "PublicCalls", "make_calls"]

try:  # the module pyOpenSSL's own methods call into
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a future pyOpenSSL without the private module
    _ffi = _lib = None

#: The largest TLS record's plaintext: one read never returns more.
RECORD = 16384
#: How much one read of the outgoing memory BIO takes.
CHUNK = 65536

_NEEDED = ("BIO_write", "BIO_read", "SSL_read", "SSL_write", "SSL_get_error")


class PublicCalls:
    """The calls through pyOpenSSL's public methods."""

    def feed(self, tls: SSL.Connection, data: bytes) -> None:
        tls.bio_write(data)

    def read(self, tls: SSL.Connection) -> bytes | None:
        """
        The next decrypted record, or L{None} when no complete one is buffered.

        @raise SSL.ZeroReturnError: the peer's close_notify.
        @raise SSL.Error: anything else wrong.
        """
        try:
            return tls.recv(RECORD)
        except SSL.WantReadError:
            return None

    def encrypt(self, tls: SSL.Connection, data: bytes) -> None:
        # pyOpenSSL turns partial writes on, so one SSL_write may take only a record;
        # sendall loops. A memory BIO never refuses: the whole of data is encrypted now.
        tls.sendall(data)

    def take(self, tls: SSL.Connection) -> bytes:
        """Everything OpenSSL wrote for the peer so far (C{b""} if nothing)."""
        chunks = []
        while True:
            try:
                chunk = tls.bio_read(CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < CHUNK:
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BindingCalls(PublicCalls):
    """
    The same calls through pyOpenSSL's cffi binding, into one buffer per listener (the
    reactor thread is the only caller).
    """

    def __init__(self) -> None:
        self._buffer = _ffi.new("char[]", CHUNK)
        self._want_read = _lib.SSL_ERROR_WANT_READ
        self._zero_return = _lib.SSL_ERROR_ZERO_RETURN

    def feed(self, tls: SSL.Connection, data: bytes) -> None:
        # Never fails for a memory BIO short of memory exhaustion; pyOpenSSL's way then.
        if _lib.BIO_write(tls._into_ssl, _ffi.from_buffer(data), len(data)) != len(data):
            raise SSL.Error([("", "BIO_write", "could not buffer received bytes")])

    def read(self, tls: SSL.Connection) -> bytes | None:
        ssl = tls._ssl
        buffer = self._buffer
        count = _lib.SSL_read(ssl, buffer, RECORD)
        if count > 0:
            record: bytes = _ffi.buffer(buffer, count)[:]
            return record
        error = _lib.SSL_get_error(ssl, count)
        if error == self._want_read:
            return None
        if error == self._zero_return:
            raise SSL.ZeroReturnError()
        tls._raise_ssl_error(ssl, count)  # pyOpenSSL's exception for anything else
        raise SSL.Error([("", "SSL_read", f"error {error}")])  # pragma: no cover

    def encrypt(self, tls: SSL.Connection, data: bytes) -> None:
        ssl = tls._ssl
        view = _ffi.from_buffer(data)
        left, done = len(data), 0
        while left:
            count = _lib.SSL_write(ssl, view + done, left)
            if count <= 0:
                tls._raise_ssl_error(ssl, count)
                raise SSL.Error([("", "SSL_write", "failed")])  # pragma: no cover
            done += count
            left -= count

    def take(self, tls: SSL.Connection) -> bytes:
        source = tls._from_ssl
        buffer = self._buffer
        count = _lib.BIO_read(source, buffer, CHUNK)
        if count <= 0:
            return b""
        data: bytes = _ffi.buffer(buffer, count)[:]
        if count < CHUNK:
            return data
        chunks = [data]
        while count == CHUNK:
            count = _lib.BIO_read(source, buffer, CHUNK)
            if count > 0:
                chunks.append(_ffi.buffer(buffer, count)[:])
        return b"".join(chunks)


def make_calls() -> PublicCalls:
    """
    L{BindingCalls} when the self-check found pyOpenSSL's binding and attributes as they use
    them, else L{PublicCalls} (asked once per listener).
    """
    return BindingCalls() if usable("tls.calls") else PublicCalls()
