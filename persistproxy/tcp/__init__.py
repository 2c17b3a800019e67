"""
The raw TCP protocol plugin (C{protocol = "tcp"}) and the byte relay that tunnels share.
"""
