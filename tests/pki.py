"""
Certificates made at test time with trustme, for the unit and the end-to-end TLS tests: one
CA, and certificates for C{site.test} (with C{localhost}) and C{other.test} (with
C{*.wild.test}), written as PEM files so that the proxy loads them as a user's would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import trustme

__all__ = ["PKI", "make_pki"]


@dataclass
class PKI:
    dir: Path
    ca: trustme.CA
    ca_pem: Path

    def issue(
        self, name: str, *hosts: str, ca: trustme.CA | None = None, **validity: datetime
    ) -> tuple[str, str]:
        """
        A certificate (with its chain) and key for C{hosts}, as C{name}.pem/.key;
        C{validity}: trustme's C{not_before}/C{not_after}.
        """
        cert = (ca or self.ca).issue_cert(*hosts, **validity)
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
        return str(cert_path), str(key_path)

    @property
    def site(self) -> tuple[str, str]:
        return str(self.dir / "site.pem"), str(self.dir / "site.key")

    @property
    def other(self) -> tuple[str, str]:
        return str(self.dir / "other.pem"), str(self.dir / "other.key")


def make_pki(directory: Path) -> PKI:
    ca = trustme.CA()
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    pki = PKI(directory, ca, ca_pem)
    pki.issue("site", "site.test", "localhost")
    pki.issue("other", "other.test", "*.wild.test")
    return pki
