# -*- test-case-name: tests.unit.test_config -*-
"""
The one exception the configuration and protocol plugins share.
"""

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """
    A configuration problem, already phrased as one line for the operator. A plugin's
    C{validate} raises it with C{"<key>: <problem>"}; the core adds the file and table.
    """
