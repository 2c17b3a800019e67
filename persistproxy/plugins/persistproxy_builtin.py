"""
The protocols that ship with persistproxy, registered like any third-party plugin.
"""

from persistproxy.http.plugin import HTTPProtocolPlugin
from persistproxy.tcp.plugin import TCPProtocolPlugin

http = HTTPProtocolPlugin()
tcp = TCPProtocolPlugin()
