"""Adafactor's factoring rule: which axes of a parameter get row and column statistics.

Kept apart from `adafactor.py` (which needs JAX and optax) because the memory estimate
applies the same rule to the parameter layout while planning, without importing JAX.
"""

from __future__ import annotations

import numpy as np

MIN_DIM_SIZE_TO_FACTOR = 128


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(second-largest, largest) axes to factor over, as optax chooses them; None: unfactored."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < MIN_DIM_SIZE_TO_FACTOR:
        return None
    return int(order[-2]), int(order[-1])
