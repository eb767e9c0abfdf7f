"""What makes a hospital's tensors acceptable in a round: the global model's names and shapes, finite values, and an
update no larger than the run's bound (plain rounds), or uint64 masked inputs of the model's shapes (secure rounds).
A refusal names its reason, which the coordinator counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from health_mlops.fl.errors import Rejected
from health_mlops.fl.mapped import LOCKSTEP_ELEMENTS, blocks
from health_mlops.fl.strategies import FOLD_CHUNK_ELEMENTS


def validate_masked(current: Mapping[str, np.ndarray], masked: Mapping[str, np.ndarray]) -> None:
    """A masked input holds the model's tensors, each of its shape, as uint64 (`fl.secagg`'s fixed point masked
    modulo 2^64): all that can be checked of it."""
    if set(masked) != set(current):
        raise Rejected("wrong_tensors", f"tensors {sorted(masked)}, expected {sorted(current)}")
    for name, tensor in masked.items():
        if tensor.dtype != np.uint64:
            raise Rejected("wrong_dtype", f"{name} is {tensor.dtype}; a masked input is uint64")
        if tensor.shape != np.shape(current[name]):
            raise Rejected("wrong_shape", f"{name} has shape {list(tensor.shape)}, expected "
                                          f"{list(np.shape(current[name]))}")


def validate_update(current: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], norm_bound: float) -> None:
    """Refuse an update that does not fit the global model: names, shapes, finiteness, size of the change."""
    if set(update) != set(current):
        missing, extra = sorted(set(current) - set(update)), sorted(set(update) - set(current))
        raise Rejected("wrong_tensors", f"missing {missing}, unexpected {extra}")
    squared = 0.0
    for name, reference in current.items():
        tensor = update[name]
        if tensor.dtype not in (np.float32, np.float64):
            raise Rejected("wrong_dtype", f"{name} is {tensor.dtype}; updates are float32 or float64")
        if tensor.shape != reference.shape:
            raise Rejected("wrong_shape", f"{name} has shape {list(tensor.shape)}, expected {list(reference.shape)}")
        # Update and global weights side by side, a block at a time: either may be mapped from its file, and
        # neither is then resident as a whole.
        for (_, block), (_, reference_block) in zip(blocks(tensor, LOCKSTEP_ELEMENTS),
                                                    blocks(reference, LOCKSTEP_ELEMENTS)):
            for start in range(0, block.size, FOLD_CHUNK_ELEMENTS):  # no temporary the size of the model
                chunk = block[start:start + FOLD_CHUNK_ELEMENTS]
                if not np.isfinite(chunk).all():
                    raise Rejected("non_finite", f"{name} holds NaN or infinite values")
                change = chunk.astype(np.float64) - reference_block[start:start + FOLD_CHUNK_ELEMENTS]
                squared += float(np.dot(change, change))
    if math.sqrt(squared) > norm_bound:
        raise Rejected("norm_exceeded", f"update norm {math.sqrt(squared):.3g} exceeds the bound {norm_bound:g}")
