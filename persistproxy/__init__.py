"""
persistproxy: a multi-protocol reverse proxy on Twisted in which the client link and the
upstream link are two independent hops, each with its own keep-alive life.
"""

__version__ = "0.1.0"
