# -*- test-case-name: tests.unit.test_h2 -*-
"""
What bounds an HTTP/2 peer beyond h2's own checks: the h2 configuration (its per-byte header
validation off: the proxy checks each field once), a frame buffer that bounds a header block
while its CONTINUATION frames arrive (CVE-2024-27316), and the token bucket that caps resets
(CVE-2023-44487) and SETTINGS/PING floods.
"""

from __future__ import annotations

import functools
from typing import Any

from h2.config import H2Configuration
from h2.exceptions import DenialOfServiceError
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, HeadersFrame

__all__ = ["PREFACE", "Bucket", "HeaderBlockBuffer", "h2_config", "header_block_probe"]

#: What a client speaking HTTP/2 with prior knowledge sends first (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_config() -> H2Configuration:
    return H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )


class HeaderBlockBuffer(FrameBuffer):
    """
    h2's frame buffer that also bounds a header block while its CONTINUATION frames are
    collected (h2 holds up to 64 frames of up to 16 KiB each), and says whether one is.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(server=True)
        self.limit = limit
        self.block = 0

    def _update_header_buffer(self, f: Any) -> Any:
        if f is not None and (
            self._headers_buffer or (isinstance(f, HeadersFrame) and "END_HEADERS" not in f.flags)
        ):
            self.block += len(f.data)
            if self.block > self.limit:
                raise DenialOfServiceError(f"header block larger than {self.limit} bytes")
        frame = super()._update_header_buffer(f)
        if not self._headers_buffer:
            self.block = 0
        return frame

    @property
    def in_header_block(self) -> bool:
        return bool(self._headers_buffer)


@functools.cache
def header_block_probe() -> str | None:
    """
    Whether L{HeaderBlockBuffer}'s hook into h2 (C{FrameBuffer._update_header_buffer} and
    C{_headers_buffer}, private) works with the installed h2: L{None}, or what went wrong.
    Without it, h2's own bound applies (64 CONTINUATION frames) and an unfinished header
    block is timed as the connection's idle time rather than by C{header_timeout}.
    """
    try:
        buffer = HeaderBlockBuffer(100)
        buffer.max_frame_size = 16384
        buffer.add_data(PREFACE + HeadersFrame(1, data=b"\x82").serialize())
        if list(buffer) or not buffer.in_header_block:
            return "a HEADERS frame without END_HEADERS was not held as a header block"
        buffer.add_data(ContinuationFrame(1, data=b"\x84" * 200).serialize())
        list(buffer)
    except DenialOfServiceError:
        return None
    except Exception as e:  # an h2 whose internals changed: any failure means "do not use"
        return f"{type(e).__name__}: {e}"
    return "a header block larger than the bound was not refused"


class Bucket:
    """A token bucket: C{rate} events per second, in bursts of as many."""

    __slots__ = ("_at", "_rate", "_tokens")

    def __init__(self, rate: float, now: float) -> None:
        self._rate = rate
        self._tokens = rate
        self._at = now

    def take(self, now: float) -> bool:
        tokens = min(self._rate, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True
