"""Every Lightning adapter test runs once per Lightning namespace."""

from __future__ import annotations

import pytest

from tests.lightning.helpers import NAMESPACES, Namespace, namespace


@pytest.fixture(params=NAMESPACES)
def ns(request: pytest.FixtureRequest) -> Namespace:
    return namespace(request.param)
