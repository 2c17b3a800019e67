"""
Registers C{protocol = "redis"} with persistproxy: Twisted's plugin system finds this module
because it sits in a C{persistproxy/plugins/} directory on C{sys.path} (this distribution
installs it into persistproxy's own), and picks up the object below, which provides
L{persistproxy.interfaces.IProtocolPlugin}. The code lives in L{persistproxy_redis}.
"""

from persistproxy_redis.plugin import RedisProtocolPlugin

redis = RedisProtocolPlugin()
