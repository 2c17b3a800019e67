"""
TLS: server contexts and SNI, certificate reload, our TLS server transport, verified TLS to
upstreams, and the few OpenSSL calls pyOpenSSL does not expose.
"""
