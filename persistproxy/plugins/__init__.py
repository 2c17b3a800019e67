"""
Protocol plugins. Any module in a C{persistproxy/plugins/} directory on C{sys.path} that
defines objects providing L{persistproxy.interfaces.IProtocolPlugin} adds a protocol.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
