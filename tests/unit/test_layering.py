"""
The package's layering, checked from the source: the core never imports a protocol, and the
plugin interface imports nothing of the proxy's machinery at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "persistproxy"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at run time or for type checking."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _modules() -> list[tuple[str, Path]]:
    return [
        (str(path.relative_to(PACKAGE.parent)), path)
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def test_the_package_is_where_this_test_looks() -> None:
    assert (PACKAGE / "interfaces.py").exists() and len(_modules()) > 20


def test_no_module_outside_http_and_the_plugin_registry_imports_http() -> None:
    offenders = [
        name
        for name, path in _modules()
        if not name.startswith(("persistproxy/http/", "persistproxy/plugins/"))
        and any(m.split(".")[:2] == ["persistproxy", "http"] for m in _imports(path))
    ]
    assert offenders == []


def test_no_module_outside_tcp_and_the_plugin_registry_imports_tcp() -> None:
    offenders = [
        name
        for name, path in _modules()
        if not name.startswith(("persistproxy/tcp/", "persistproxy/plugins/"))
        and any(m.split(".")[:2] == ["persistproxy", "tcp"] for m in _imports(path))
    ]
    assert offenders == []


#: What of persistproxy a plugin may import: the plugin interface and the public building
#: blocks (the byte relay that tunnels and CONNECT share, the shared-timer TimeoutQueue).
PLUGIN_TOOLKIT = ("persistproxy.interfaces", "persistproxy.relay", "persistproxy.timers")


def test_the_tcp_plugin_is_written_against_the_interfaces_only() -> None:
    """Of persistproxy, tcp/plugin.py imports only the plugin toolkit: what a third-party
    plugin could."""
    used = {
        m
        for m in _imports(PACKAGE / "tcp" / "plugin.py")
        if m.split(".")[0] == "persistproxy"
    }
    assert used and all(m in PLUGIN_TOOLKIT for m in used), used


EXAMPLE = PACKAGE.parent / "examples" / "redis"


def test_the_redis_example_is_written_against_the_interfaces_only() -> None:
    """The Redis plugin, a separate distribution, imports of persistproxy what any third
    party may: the plugin toolkit (it uses the interface and the timeout queue)."""
    files = [
        *sorted((EXAMPLE / "persistproxy_redis").rglob("*.py")),
        EXAMPLE / "persistproxy" / "plugins" / "redis_proxy.py",
    ]
    used = {
        (path.name, m)
        for path in files
        for m in _imports(path)
        if m.split(".")[0] == "persistproxy"
    }
    assert len(files) > 4 and used
    assert all(m in PLUGIN_TOOLKIT for _, m in used), used


def test_the_redis_example_ships_no_package_of_persistproxys() -> None:
    """Its plugin module sits in persistproxy/plugins/ with no __init__.py above it, so
    installing it adds one file to persistproxy's plugin directory and replaces nothing."""
    assert (EXAMPLE / "persistproxy" / "plugins" / "redis_proxy.py").exists()
    assert not (EXAMPLE / "persistproxy" / "__init__.py").exists()
    assert not (EXAMPLE / "persistproxy" / "plugins" / "__init__.py").exists()


def test_only_net_and_tls_reach_into_twisted_and_pyopenssl_internals() -> None:
    """Private modules of Twisted and pyOpenSSL (C{_sslverify}, C{_util}) are imported only
    inside net/ and tls/, where the start-up self-check fences them."""
    offenders = [
        (name, m)
        for name, path in _modules()
        if not name.startswith(("persistproxy/net/", "persistproxy/tls/"))
        for m in _imports(path)
        if (m.startswith(("twisted.", "OpenSSL.")) and any(p.startswith("_") for p in m.split(".")))
    ]
    assert offenders == []


def test_the_interfaces_module_needs_only_config_and_errors_at_run_time() -> None:
    tree = ast.parse((PACKAGE / "interfaces.py").read_text())
    runtime = {
        node.module
        for node in tree.body  # module level only: TYPE_CHECKING imports sit inside an `if`
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("persistproxy")
    }
    assert runtime <= {"persistproxy.config", "persistproxy.errors"}
