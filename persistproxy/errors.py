# -*- test-case-name: tests.unit.test_config -*-
"""
The exceptions the configuration, the start-up and protocol plugins share.
"""

__all__ = ["ConfigError", "StartupError"]


class ConfigError(Exception):
    """
    A configuration problem, already phrased as one line for the operator. A plugin's
    C{validate} raises it with C{"<key>: <problem>"}; the core adds the file and table.
    """


class StartupError(Exception):
    """
    Something the configuration asks for cannot be done at start (a port in use), phrased
    as C{"<key>: <problem>"} like a L{ConfigError}: the twistd plugin adds the file's name
    and prints it as the one line a configuration error is, on standard error.
    """
