"""
persistproxy-redis: C{protocol = "redis"} for persistproxy, a RESP proxy whose clients share
pooled server connections (see L{persistproxy_redis.session}). The plugin object is
registered by C{persistproxy/plugins/redis_proxy.py}.
"""

__version__ = "0.1.0"
