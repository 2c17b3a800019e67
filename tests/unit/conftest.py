"""
Fixtures shared by the unit tests: the test-time certificates (made once per module) and a
fresh Clock.
"""

from __future__ import annotations

import pytest
from pki import PKI, make_pki
from twisted.internet.task import Clock


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def clock() -> Clock:
    return Clock()
