"""
The example's tests. A package, so that pytest puts C{examples/redis} first on C{sys.path}
(its rootdir-relative import mode): they test the source tree, not a copy installed earlier.
"""
