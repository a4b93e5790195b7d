"""Checkpoint files: a trained model's weights and its training state, as plain data.

A checkpoint is written by :func:`save` and read by :func:`load`, with ``torch.load(...,
weights_only=True)``: what it may hold is tensors, numbers, strings, bytes, ``None`` and lists,
tuples and dicts of them. Reading one therefore cannot run code, whoever made the file -- a
pickled object that would (a class to import, a function to call) is refused with a
:class:`CheckpointError` before anything of it is built.

A checkpoint written by a fem_moe that kept numpy arrays in it (its warm starts) is refused the
same way; if it is your own, ``python -m fem_moe convert-checkpoint PATH`` rewrites it in this
form (that one command unpickles it in full: run it only on files you made).

Not collective: the trainer writes on rank 0 and reads on every rank.
"""
import io
import pickle

import numpy as np
import torch

from .collective import InputError
from .report import write_atomic

__all__ = ["CheckpointError", "save", "load", "convert", "to_plain", "to_arrays"]


class CheckpointError(InputError):
    """A checkpoint cannot be read: missing, truncated, or holding objects that are not plain
    data (which loading would have to run code to build)."""


def to_plain(value):
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers, recursively
    through lists, tuples and dicts: what ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def to_arrays(value):
    """The inverse of :func:`to_plain` for what was stored as arrays: tensors as numpy arrays,
    recursively through lists, tuples and dicts."""
    if isinstance(value, dict):
        return {k: to_arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_arrays(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return value


def save(path, state):
    """Write ``state`` (see :func:`to_plain`) to ``path`` atomically: a temporary file renamed
    over the old one, so an interruption leaves the previous checkpoint intact."""
    buf = io.BytesIO()
    torch.save(to_plain(state), buf)
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def load(path, map_location=None):
    """The state written by :func:`save`, its tensors on ``map_location``. Raises
    :class:`CheckpointError` naming the file if it cannot be read or holds anything but plain
    data; nothing in the file is run."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects that are not plain data, which loading would have "
            f"to run code to build; it was refused unread ({str(e).splitlines()[0]}). A "
            f"checkpoint of your own made by an older fem_moe can be rewritten as plain data "
            f"with: python -m fem_moe convert-checkpoint {path}") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def convert(path, out=None):
    """Rewrite a checkpoint of an older fem_moe (numpy arrays inside) as plain data, to ``out``
    (default: over ``path``). This unpickles the file in full, which can run code: only for
    files you made yourself."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    save(out or path, state)
    return out or path
