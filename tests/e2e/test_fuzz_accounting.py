"""
A differential fuzz of the accounting promise: every request an origin parsed has exactly one
access line, no origin ever sees a malformed request, and the proxy keeps serving.

Hypothesis generates streams of pipelined requests, well-formed ones (methods, origin- or
absolute-form targets, headers, Content-Length or chunked bodies with extensions and
trailers) with mutations on top: malformed chunk sizes, chunk data overrunning its size,
Content-Length with Transfer-Encoding, duplicate or malformed Content-Length, bad header names
and values, obsolete line folding, bare LF, odd transfer codings, versions, methods and
targets, missing or repeated Host, oversized lines, too many fields, huge trailers, a
Connection header nominating framing headers, Upgrade, Expect; then bytes truncated, inserted
or flipped. Each stream is sent, in a few segments, through one real C{twistd persistproxy}
to tests/e2e/origin.py in its recording mode; the client then half-closes and reads until the
proxy closes, or resets the connection at once, or stalls until the proxy's timeouts close it.

After each stream, the check is differential. Every request the origin parsed (its target
carries the stream's token, C{/echo/fuzz/<example>/<n>}) must have an access line that names
the upstream server (not a refused request's placeholder line), and no more parses than that
line's retries explain; no path may have more access lines than requests in the stream could
have produced; no record may say the origin's parser refused something; the proxy may log no
traceback; and a control GET on a fresh connection gets 200, and its access line (which comes
after the stream's) marks the point up to which the access lines are complete.

C{make test} runs a bounded, derandomized profile (C{ci}: fixed examples, reproducible);
C{make fuzz} runs the C{fuzz} profile (C{HYPOTHESIS_PROFILE=fuzz}, C{FUZZ_EXAMPLES} examples,
random). A summary is printed at the end of the module (C{-s} shows it).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from e2ehelpers import Origin, Proxy, get, make_config, parse_json_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# -- profiles ----------------------------------------------------------------------------------

_COMMON: dict[str, Any] = {
    # One example is tens of milliseconds of real I/O; the deadline only catches a hang
    # that the waits below would not.
    "deadline": timedelta(seconds=30),
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    "database": None,
    "print_blob": True,
}
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "3000")), **_COMMON
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The proxy's bounds, small so that mutations reach them with small streams, and its timeouts
# short so that a client that stalls (one stream in ten) meets them in half a second.
LISTENER = {
    "max_head_size": 4096,
    "max_header_count": 20,
    "max_body_size": 4096,
    "header_timeout": 0.5,
    "body_timeout": 0.5,
    "keepalive_timeout": 0.5,
}
WAIT = 10.0  # seconds any single wait of an example may take before it is a failure

# -- requests ----------------------------------------------------------------------------------

TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]


@dataclass
class Request:
    """
    One request as a list of parts, so that mutations can act on its structure: C{line},
    C{header}, C{end} (the empty line), C{body}, C{size}, C{data} and C{trailer} parts;
    every part but C{body} is followed by CRLF (or C{eol}).
    """

    parts: list[tuple[str, bytes]]
    chunked: bool
    eol: bytes = b"\r\n"

    def serialize(self, path: bytes) -> bytes:
        out = []
        for kind, value in self.parts:
            value = value.replace(b"{PATH}", path)
            if kind == "body":
                out.append(value)
            elif kind in ("line", "header", "end"):
                out.append(value + self.eol)
            else:
                out.append(value + b"\r\n")
        return b"".join(out)

    def index(self, kind: str) -> list[int]:
        return [i for i, (k, _) in enumerate(self.parts) if k == kind]

    def add_header(self, line: bytes) -> None:
        self.parts.insert(self.index("end")[0], ("header", line))


@st.composite
def requests(draw: st.DrawFn, last: bool) -> Request:
    """A well-formed request; the last of a stream usually says Connection: close."""
    method = draw(st.sampled_from(METHODS))
    query = draw(st.sampled_from([b"", b"?q=1", b"?a=b&c=%20d"]))
    target = b"{PATH}" + query
    if draw(st.integers(0, 9)) == 0:
        target = b"http://e2e.test" + target
    version = b"HTTP/1.1" if draw(st.integers(0, 9)) else b"HTTP/1.0"
    parts: list[tuple[str, bytes]] = [("line", b"%s %s %s" % (method, target, version))]
    parts.append(("header", b"Host: e2e.test"))
    names = st.text(TOKEN, min_size=1, max_size=10).map(lambda s: b"X-" + s.encode())
    values = st.text(VCHAR + " ", max_size=30).map(lambda s: s.strip().encode())
    for name, value in draw(st.lists(st.tuples(names, values), max_size=4)):
        parts.append(("header", name + b": " + value))
    kind = draw(st.sampled_from(["none", "none", "none", "length", "length", "chunked", "chunked"]))
    if version == b"HTTP/1.0" and kind == "chunked":
        kind = "length"
    if last and draw(st.integers(0, 4)):
        parts.append(("header", b"Connection: close"))
    elif version == b"HTTP/1.0":
        parts.append(("header", b"Connection: keep-alive"))
    body: list[tuple[str, bytes]] = []
    if kind == "length":
        data = draw(st.binary(max_size=200))
        parts.append(("header", b"Content-Length: %d" % len(data)))
        body = [("body", data)]
    elif kind == "chunked":
        parts.append(("header", b"Transfer-Encoding: chunked"))
        for data in draw(st.lists(st.binary(min_size=1, max_size=80), max_size=4)):
            ext = draw(st.sampled_from([b"", b"", b";a=1", b";name"]))
            body += [("size", b"%x%s" % (len(data), ext)), ("data", data)]
        body.append(("size", b"0"))
        for name, value in draw(st.lists(st.tuples(names, values), max_size=2)):
            body.append(("trailer", name + b": " + value))
        body.append(("trailer", b""))
    parts.append(("end", b""))
    return Request(parts + body, kind == "chunked")


# -- mutations ---------------------------------------------------------------------------------


def _replace_line(req: Request, make: Callable[[bytes], bytes]) -> None:
    req.parts[0] = ("line", make(req.parts[0][1]))


def _framing_value(req: Request, name: bytes) -> list[int]:
    prefix = name.lower() + b":"
    return [i for i in req.index("header") if req.parts[i][1].lower().startswith(prefix)]


#: Mutations of any request, and of a chunked one (which the issue's case was).
MUTATIONS = [
    "bad_cl",
    "bad_header_name",
    "bad_header_value",
    "obs_fold",
    "bare_lf",
    "te_variant",
    "bad_version",
    "bad_method",
    "bad_target",
    "no_host",
    "two_hosts",
    "oversized_line",
    "many_headers",
    "nominate",
    "upgrade",
    "expect",
]
CHUNKED_MUTATIONS = [
    "bad_chunk_size",
    "bad_chunk_size",
    "chunk_overrun",
    "cl_and_te",
    "huge_trailer",
    "big_body",
]


@st.composite
def mutate(draw: st.DrawFn, req: Request) -> str:
    """Apply one structural mutation to C{req}; returns its name."""
    kinds = MUTATIONS
    if req.chunked:
        # Half the time a chunked request gets a mutation of its body: the case.
        kinds = CHUNKED_MUTATIONS if draw(st.booleans()) else MUTATIONS + CHUNKED_MUTATIONS
    if _framing_value(req, b"content-length"):
        kinds = [*kinds, "duplicate_cl"]
    kind = draw(st.sampled_from(kinds))
    sizes = req.index("size")
    if kind == "bad_chunk_size" and sizes:
        i = draw(st.sampled_from(sizes))
        bad = [b"zz", b"-1", b"0x5", b"", b"1 1", b"f" * 20, b" 5", b"5\x00", b"+5"]
        req.parts[i] = ("size", draw(st.sampled_from(bad)))
    elif kind == "chunk_overrun" and req.index("data"):
        i = draw(st.sampled_from(req.index("data")))
        req.parts[i] = ("data", req.parts[i][1] + draw(st.binary(min_size=1, max_size=8)))
    elif kind == "cl_and_te" and req.chunked:
        req.add_header(b"Content-Length: %d" % draw(st.integers(0, 50)))
    elif kind == "duplicate_cl" and _framing_value(req, b"content-length"):
        value = req.parts[_framing_value(req, b"content-length")[0]][1].split(b":")[1].strip()
        other = draw(st.sampled_from([value, b"%d" % (int(value) + 1), value + b", " + value]))
        req.add_header(b"Content-Length: " + other)
    elif kind == "bad_cl":
        value = draw(st.sampled_from([b"abc", b"-1", b"1 1", b"0x10", b"9" * 25, b"", b"+1"]))
        for i in reversed(_framing_value(req, b"content-length")):
            del req.parts[i]
        req.add_header(b"Content-Length: " + value)
    elif kind == "bad_header_name":
        name = draw(st.sampled_from([b"X Y", b"X-A ", b" X", b"", b"X(", b"X\x7f", b"\xc3\xa9"]))
        req.add_header(name + b": v")
    elif kind == "bad_header_value":
        value = draw(st.sampled_from([b"a\x00b", b"a\x7fb", b"a\rb", b"\x01", b"a\x1bb"]))
        req.add_header(b"X-V: " + value)
    elif kind == "obs_fold":
        req.add_header(b"X-Fold: a")
        req.add_header(draw(st.sampled_from([b" b", b"\tb"])))
    elif kind == "bare_lf":
        req.eol = b"\n"
    elif kind == "te_variant":
        value = draw(
            st.sampled_from(
                [b"chunked, chunked", b"gzip, chunked", b"Chunked", b"chunked ", b"xchunked",
                 b"identity", b"chunked;q=1", b"", b"chunked\x0b"]
            )
        )
        for i in reversed(_framing_value(req, b"transfer-encoding")):
            del req.parts[i]
        req.add_header(b"Transfer-Encoding: " + value)
        if draw(st.booleans()):
            req.add_header(b"Transfer-Encoding: chunked")
    elif kind == "bad_version":
        version = draw(
            st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1.10", b"HTTP/x.y", b"HTTP/1.1x",
                             b"http/1.1", b"HTTP/0.9", b""])
        )
        _replace_line(req, lambda line: line.rsplit(b" ", 1)[0] + b" " + version)
    elif kind == "bad_method":
        method = draw(st.sampled_from([b"GE T", b"get", b"BREW", b"G\x00T", b"CONNECT", b"PRI"]))
        _replace_line(req, lambda line: method + b" " + line.split(b" ", 1)[1])
    elif kind == "bad_target":
        extra = draw(st.sampled_from([b" x", b"\x00", b"\x7f", b"#frag", b"\xff", b"%", b"\\"]))
        _replace_line(req, lambda line: line.replace(b"{PATH}", b"{PATH}" + extra, 1))
    elif kind == "no_host":
        for i in reversed(_framing_value(req, b"host")):
            del req.parts[i]
    elif kind == "two_hosts":
        req.add_header(draw(st.sampled_from([b"Host: e2e.test", b"Host: other.test"])))
    elif kind == "oversized_line":
        if draw(st.booleans()):
            req.add_header(b"X-Big: " + b"a" * 5000)
        else:
            _replace_line(req, lambda line: line.replace(b"{PATH}", b"{PATH}/" + b"a" * 5000))
    elif kind == "many_headers":
        for n in range(25):
            req.add_header(b"X-M%d: %d" % (n, n))
    elif kind == "huge_trailer" and req.chunked:
        req.parts.insert(len(req.parts) - 1, ("trailer", b"X-T: " + b"t" * 5000))
    elif kind == "nominate":
        name = draw(st.sampled_from([b"content-length", b"transfer-encoding", b"host"]))
        req.add_header(b"Connection: " + name)
    elif kind == "upgrade":
        req.add_header(b"Upgrade: websocket")
        req.add_header(b"Connection: Upgrade")
    elif kind == "expect":
        req.add_header(b"Expect: 100-continue")
    elif kind == "big_body" and req.chunked:
        at = req.index("size")[-1]
        req.parts[at:at] = [("size", b"%x" % 3000), ("data", b"b" * 3000)] * 2
    else:
        return "none"
    return kind


@dataclass
class Stream:
    """What one example sends: its requests, and what is done to the bytes and the socket."""

    requests: list[Request]
    mutations: list[str]
    #: (kind, where as a fraction of the stream, bytes): truncate, insert or flip.
    byte_mutations: list[tuple[str, float, bytes]]
    #: Where the stream is split into separate sends, as fractions.
    splits: list[float]
    #: "fin": half-close and read until the proxy closes; "reset": reset once sent; "stall":
    #: read until the proxy closes (at its header, body or keep-alive timeout).
    ending: str

    def render(self, token: bytes) -> bytes:
        data = b"".join(
            r.serialize(b"/echo/fuzz/%s/%d" % (token, n)) for n, r in enumerate(self.requests)
        )
        for kind, where, extra in self.byte_mutations:
            at = int(where * len(data))
            if kind == "truncate":
                data = data[:at]
            elif kind == "insert":
                data = data[:at] + extra + data[at:]
            else:
                data = data[:at] + extra[:1] + data[at + 1 :]
        return data


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    count = draw(st.integers(1, 5))
    reqs = [draw(requests(n == count - 1)) for n in range(count)]
    mutations = []
    chunked = [r for r in reqs if r.chunked]
    for _ in range(draw(st.integers(0, 2))):
        pick = chunked if chunked and draw(st.booleans()) else reqs
        mutations.append(draw(mutate(draw(st.sampled_from(pick)))))
    fractions = st.floats(0, 1, allow_nan=False)
    byte_mutations = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["truncate", "insert", "flip"]),
                fractions,
                st.binary(min_size=1, max_size=16),
            ),
            max_size=1 if draw(st.integers(0, 3)) else 0,
        )
    )
    return Stream(
        reqs,
        mutations,
        byte_mutations,
        sorted(draw(st.lists(fractions, max_size=3))),
        draw(st.sampled_from(["fin"] * 6 + ["reset"] * 3 + ["stall"])),
    )


# -- the proxy's output ------------------------------------------------------------------------


class ProxyLog:
    """The proxy's access lines by path, read incrementally; and any traceback it logged."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.seen = 0
        self.by_path: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.new: list[dict[str, Any]] = []
        self.tracebacks: list[str] = []

    def poll(self) -> None:
        lines = self.proxy.lines()
        for line in lines[self.seen :]:
            event = parse_json_line(line)
            if event is None:
                if "Traceback" in line:
                    self.tracebacks.append(line)
                continue
            if "traceback" in event:
                self.tracebacks.append(event["traceback"])
            if event.get("event") == "access":
                self.by_path[event["path"]].append(event)
                self.new.append(event)
        self.seen = len(lines)

    def wait_for(self, path: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if self.by_path.get(path):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def take_new(self) -> list[dict[str, Any]]:
        new, self.new = self.new, []
        return new


# -- the client --------------------------------------------------------------------------------


def send_stream(port: int, data: bytes, splits: list[float], ending: str) -> bytes:
    """Send C{data} in pieces, then end as told; returns what the proxy answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    got = bytearray()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cuts = [0, *(int(f * len(data)) for f in splits), len(data)]
        try:
            for start, end in itertools.pairwise(cuts):
                if end > start:
                    sock.sendall(data[start:end])
        except (BrokenPipeError, ConnectionResetError):
            return bytes(got)  # the proxy refused the stream and closed first
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        if ending == "fin":
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + WAIT
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(
                    f"the proxy kept the connection open {WAIT:g}s ({ending});"
                    f" it answered {bytes(got[:300])!r}"
                ) from None
            if not chunk:
                break
            got += chunk
        return bytes(got)
    finally:
        sock.close()


# -- the test ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the run did, printed at the end of the module."""

    examples: int = 0
    requests: int = 0
    parsed: int = 0
    parsed_cut: int = 0
    lines: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    aborted: collections.Counter[str] = field(default_factory=collections.Counter)
    mutations: collections.Counter[str] = field(default_factory=collections.Counter)
    endings: collections.Counter[str] = field(default_factory=collections.Counter)
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"\nfuzz: {self.examples} examples in {seconds:.1f}s, {self.requests} requests"
            f" generated; the origin parsed {self.parsed} (of which {self.parsed_cut} had their"
            f" body cut), {self.lines} access lines checked"
            f"\n  statuses {dict(sorted(self.statuses.items()))}"
            f"\n  aborted {dict(self.aborted)}"
            f"\n  mutations {dict(self.mutations.most_common())}"
            f"\n  endings {dict(self.endings)}"
        )


class Fuzz:
    """The session's proxy and origin, and everything learnt across examples."""

    def __init__(self, proxy: Proxy, origin: Origin) -> None:
        self.proxy = proxy
        self.origin = origin
        self.log = ProxyLog(proxy)
        self.run = uuid.uuid4().hex[:6]
        self.serial = 0
        #: Paths the origin parsed, with how many times; checked against the access lines.
        self.parsed: collections.Counter[str] = collections.Counter()
        self.unchecked: set[str] = set()
        self.tally = Tally()

    def example(self, stream: Stream) -> None:
        self.serial += 1
        token = b"%s-%d" % (self.run.encode(), self.serial)
        data = stream.render(token)
        self.tally.examples += 1
        self.tally.requests += len(stream.requests)
        self.tally.mutations.update(stream.mutations)
        self.tally.mutations.update(kind for kind, _, _ in stream.byte_mutations)
        self.tally.endings[stream.ending] += 1
        answer = send_stream(self.proxy.port, data, stream.splits, stream.ending)
        control = f"/echo/fuzz/{token.decode()}/control"
        response = get(self.proxy.port, control, timeout=WAIT)
        context = f"stream {data[:2000]!r}\nanswer {answer[:2000]!r}"
        assert response.status == 200, f"the control request got {response}\n{context}"
        assert self.log.wait_for(control, WAIT), f"no access line for {control}"
        self.check(data, context)

    def check(self, data: bytes, context: str) -> None:
        """
        The differential check, up to the control request's access line. Everything learnt
        is taken in before anything is asserted, so that a failure is this example's alone
        (Hypothesis replays and shrinks it against the same proxy).
        """
        bad: list[dict[str, Any]] = []
        deadline = time.monotonic() + 3
        while True:
            bad += self.absorb_records()
            self.log.poll()
            missing = [p for p in self.unchecked if self.parsed[p] > self.tries(p)]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # a record that got ahead of its line: give the log a turn
        self.unchecked.clear()
        tracebacks, self.log.tracebacks = self.log.tracebacks, []
        new = self.log.take_new()
        assert not bad, f"the origin saw a malformed request: {bad}\n{context}"
        # A path is counted over the whole run: a mutation can make two examples' paths equal.
        assert not missing, "".join(
            f"the origin parsed {p} {self.parsed[p]} times, and its access lines"
            f" {self.log.by_path.get(p, [])} account for {self.tries(p)}\n"
            for p in missing
        ) + context
        assert not tracebacks, f"the proxy logged {tracebacks}\n{context}"
        lines = collections.Counter(line["path"] for line in new)
        for line in new:
            self.tally.lines += 1
            self.tally.statuses[line["status"]] += 1
            if "aborted" in line:
                self.tally.aborted[line["aborted"]] += 1
        for path, count in lines.items():
            if path == "-" or path.endswith("/control"):
                continue
            could = max(1, data.count(path.encode("latin-1")))
            assert count <= could, (
                f"{path} has {count} access lines, for {could} request(s) in the stream:"
                f" {[line for line in new if line['path'] == path]}\n{context}"
            )

    def tries(self, path: str) -> int:
        """
        How many times the access lines of C{path} say it was sent to an origin, at most:
        only the lines of exchanges that went upstream count (they name the server), not
        the placeholder line of a request refused in the proxy.
        """
        lines = self.log.by_path.get(path, [])
        return sum(1 + line["retries"] for line in lines if line["upstream"] is not None)

    def absorb_records(self) -> list[dict[str, Any]]:
        """Take the origin's new records in; returns those its parser refused."""
        bad = []
        for record in self.origin.take_records():
            if record["bad"] is not None:
                bad.append(record)
                continue
            path = record["target"].partition("?")[0]
            self.parsed[path] += 1
            self.unchecked.add(path)
            if not path.endswith("/control"):
                self.tally.parsed += 1
                self.tally.parsed_cut += record["body"] == "pending"
        return bad


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    """One recording origin and one proxy for every example of the session."""
    origin = Origin(record=True)
    proxy = None
    try:
        config = tmp_path_factory.mktemp("fuzz") / "persistproxy.toml"
        # Access lines written at the end of each event-loop turn, not batched for 0.5 s:
        # each example waits for its control request's line.
        text = make_config([f"127.0.0.1:{origin.port}"], LISTENER) + "\n[log]\naccess_flush = 0\n"
        config.write_text(text)
        proxy = Proxy(str(config), cwd=str(config.parent))
        state = Fuzz(proxy, origin)
        yield state
        print(state.tally.summary())
    finally:
        if proxy is not None:
            proxy.terminate(5)
            proxy.kill()
        origin.kill()


@PROFILE
@given(stream=streams())
def test_every_request_an_origin_parsed_has_one_access_line(fuzz: Fuzz, stream: Stream) -> None:
    fuzz.example(stream)
