from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _strict_numpy():
    # Numerical mistakes (overflow, 0/0) fail tests instead of passing silently.
    old = np.seterr(all="raise", under="ignore")
    yield
    np.seterr(**old)
