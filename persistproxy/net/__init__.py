"""
Every hook into Twisted's internals, fenced in one place: the fast write path, the accept loop,
the epoll reactor, socket options and the start-up self-check of what they rely on.
"""
