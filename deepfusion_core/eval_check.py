"""The validation batches every evaluation uses, and the check that there are enough of them.

The batches are kept on disk (`batch_cache`), so a plan made again checks them, and a node
evaluates on them, without starting TensorFlow or seqio.
"""

from __future__ import annotations

import numpy as np

from deepfusion_core.batch_cache import validation_batches
from deepfusion_core.config import DataConfig, DataError


def check_enough(cfg: DataConfig, found: int, num_batches: int) -> None:
    """Raise `DataError` if `found` validation batches are fewer than `num_batches`."""
    if found < num_batches:
        raise DataError(f"the validation split of {cfg.source!r} has only {found} batches of "
                        f"{cfg.batch_size}, not {num_batches}")


def eval_batches(cfg: DataConfig, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the validation split, the same on every call and
    in every process: unshuffled, span masks from a fixed seed (the training seed does not
    change them, so runs that differ in it are evaluated on the same examples)."""
    batches = validation_batches(cfg, num_batches)
    check_enough(cfg, len(batches), num_batches)
    return batches


def check_eval_batches(cfg: DataConfig, num_batches: int) -> None:
    """Raise `DataError` if the validation split makes fewer than `num_batches` batches.

    The first time for a data config the batches are made (about 1.5 s for 4 to 16 batches of
    the builtin data or the C4 sample on a 2-core CPU, 3 to 5 s more in a process that has not
    started TensorFlow yet) and kept; later checks and evaluations read them from the cache,
    keyed as `batch_cache` says.
    """
    eval_batches(cfg, num_batches)
