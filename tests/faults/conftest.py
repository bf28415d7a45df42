"""The fault suite shares one Lab: the prepared store and the reference runs are built once per session."""
from __future__ import annotations

import pytest

from tests.faults.harness import Lab


@pytest.fixture(scope="session")
def lab(tmp_path_factory, moto_server):
    lab = Lab(tmp_path_factory.mktemp("faults"), moto=moto_server)
    yield lab
    lab.close()
