"""deepfusion_core: T5.1.1 in Flax, deep fusion, data, training and checkpoints.

The public API is small and stable; everything else is an implementation detail.
"""

from deepfusion_core.checkpoint import load_model, save_model
from deepfusion_core.config import PRESETS, T5Config
from deepfusion_core.fusion import fuse
from deepfusion_core.model import count_params, forward, init_params

__all__ = ["T5Config", "PRESETS", "count_params", "init_params", "forward", "fuse",
           "save_model", "load_model"]
