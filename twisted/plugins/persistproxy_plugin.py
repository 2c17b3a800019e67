"""
The twistd dropin: C{twistd persistproxy}. It imports nothing of persistproxy until used.
"""

from twisted.application.service import ServiceMaker

persistproxy = ServiceMaker(
    "persistproxy",
    "persistproxy.tap",
    "A reverse proxy with independent keep-alive on the client and upstream hops.",
    "persistproxy",
)
