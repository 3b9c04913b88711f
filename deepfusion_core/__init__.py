"""deepfusion_core: T5.1.1 in Flax, deep fusion, data, training and checkpoints.

The public API is small and stable; everything else is an implementation detail. Its names
are imported on first use (PEP 562), so that importing a light submodule (`config`,
`param_layout`, `fusion`, `memory`, `mesh_spec`) does not load JAX, flax and Orbax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_EXPORTS = {
    "T5Config": "config", "PRESETS": "config",
    "count_params": "param_layout",
    "init_params": "model", "forward": "model",
    "fuse": "fusion",
    "save_model": "checkpoint", "load_model": "checkpoint",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from deepfusion_core.checkpoint import load_model, save_model
    from deepfusion_core.config import PRESETS, T5Config
    from deepfusion_core.fusion import fuse
    from deepfusion_core.model import forward, init_params
    from deepfusion_core.param_layout import count_params


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
