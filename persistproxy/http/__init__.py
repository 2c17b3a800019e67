"""
The HTTP/1.x reverse proxy: client connections, exchanges and upstream connections.
"""
