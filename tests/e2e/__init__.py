"""End-to-end tests. A package, so that test module basenames may repeat those of tests/unit."""
