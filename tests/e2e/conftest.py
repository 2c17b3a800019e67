"""Fixtures for the end-to-end tests: a real origin process and the real proxy under twistd."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/e2e is a package (its test modules are e2e.test_*, so basenames may repeat those in
# tests/unit); the helpers are imported by their plain name from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2ehelpers import ALL_PROCS, TWISTD, Origin, Proxy, make_config
from scriptorigin import Script, ScriptOrigin


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


@pytest.fixture(autouse=True)
def _dump_output_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """On a failing test, print what every origin/proxy involved wrote during the test."""
    start = {id(p): len(p.all_output()) for p in ALL_PROCS}
    first_new = len(ALL_PROCS)
    yield
    failed = any(getattr(request.node, "rep_" + w, None) is not None
                 and getattr(request.node, "rep_" + w).failed for w in ("setup", "call"))
    if not failed:
        return
    for i, p in enumerate(ALL_PROCS):
        if i < first_new and id(p) not in start:
            continue
        if i < first_new and p.proc.poll() is not None and start[id(p)] == len(p.all_output()):
            continue
        out = p.all_output()[start.get(id(p), 0):]
        print(f"----- {p.name} pid={p.pid} exit={p.proc.poll()} argv={' '.join(p.argv)}")
        print("\n".join(out[-400:]) if out else "(no output)")


def _require_twistd() -> None:
    if not Path(TWISTD).exists():
        pytest.fail(f"{TWISTD} does not exist: run `make venv` and run the tests with "
                    f".venv/bin/python -m pytest")


# -- origin ------------------------------------------------------------------------------------

@pytest.fixture
def origin_factory() -> Iterator[Callable[..., Origin]]:
    """origin_factory(idle_close=None) -> a fresh origin process, killed at teardown."""
    started: list[Origin] = []

    def factory(**opts: Any) -> Origin:
        o = Origin(**opts)
        started.append(o)
        return o

    yield factory
    for o in started:
        o.kill()


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    """One origin shared by a module (tests measure counter deltas, never absolute values)."""
    o = Origin()
    yield o
    o.kill()


@pytest.fixture
def fresh_origin(origin_factory: Callable[..., Origin]) -> Origin:
    return origin_factory()


@pytest.fixture
def script_origin() -> Iterator[Callable[[Script], ScriptOrigin]]:
    """script_origin(script) -> a raw-socket origin running script per connection, closed at
    teardown (tests/e2e/scriptorigin.py)."""
    made: list[ScriptOrigin] = []

    def factory(script: Script) -> ScriptOrigin:
        o = ScriptOrigin(script)
        made.append(o)
        return o

    yield factory
    for o in made:
        o.close()


# -- proxy -------------------------------------------------------------------------------------

class ProxyFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Proxy] = []
        self.n = 0

    def config_file(self, text: str) -> Path:
        self.n += 1
        d = self.base / f"proxy{self.n}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "persistproxy.toml"
        path.write_text(text)
        return path

    def __call__(self, origin: Origin | None = None, *, listener: dict[str, Any] | None = None,
                 upstream: dict[str, Any] | None = None, servers: list[str] | None = None,
                 config_text: str | None = None) -> Proxy:
        _require_twistd()
        if config_text is None:
            if servers is None:
                assert origin is not None, "give an origin or servers"
                servers = [f"127.0.0.1:{origin.port}"]
            config_text = make_config(servers, listener, upstream)
        path = self.config_file(config_text)
        p = Proxy(str(path), cwd=str(path.parent))
        self.started.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.started:
            p.terminate(5)
            p.kill()


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """proxy_factory(origin, listener={...}, upstream={...}) -> a started proxy (function scope)."""
    f = ProxyFactory(tmp_path)
    yield f
    f.cleanup()


@pytest.fixture(scope="module")
def proxy(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A default-config proxy in front of the module's origin, shared by the module."""
    f = ProxyFactory(tmp_path_factory.mktemp("proxy"))
    p = f(origin)
    yield p
    f.cleanup()
