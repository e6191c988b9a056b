"""The `backend` fixture: every op test runs once per concrete backend (fastddpm.ops.CONCRETE_BACKENDS);
a test restricted to some backends says so with @pytest.mark.parametrize("backend", [...], indirect=True)."""

import pytest

from fastddpm import ops

from .backends import Backend
from .backends import backend as make_backend


@pytest.fixture(params=ops.CONCRETE_BACKENDS)
def backend(request) -> Backend:
    return make_backend(request.param)
