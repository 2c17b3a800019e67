"""
The upstream side, for every protocol: groups of servers, balancing, and pools of persistent
connections that lend whatever a protocol's connector makes.
"""
