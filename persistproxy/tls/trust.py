# -*- test-case-name: tests.unit.test_tls_upstream -*-
"""
The CA file an upstream's certificates are verified against (C{tls_ca}): read by the config
check, so C{--check} catches a bad file, and by the upstream TLS policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.ssl import Certificate, trustRootFromCertificates

if TYPE_CHECKING:  # Twisted exports the interface from no public module
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = ["load_trust_root"]


def load_trust_root(path: str) -> IOpenSSLTrustRoot:
    """
    The CA certificates of a PEM file (C{tls_ca}) as a trust root.

    @raise ValueError: with a one-line reason; L{OSError} if the file cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("no PEM certificate in the file") from None
    return trustRootFromCertificates(  # type: ignore[no-any-return]
        [Certificate(crypto.X509.from_cryptography(c)) for c in certificates]
    )
