"""Checkpoints are plain data: loading one cannot run code, whoever made the file; the trainer's
checkpoints round-trip through the safe format; an older checkpoint is refused with a message
that names the conversion, which then makes it loadable."""
import os
import tempfile

import numpy as np
import pytest
import torch

from fem_moe import checkpoint


class Payload:
    """What a malicious checkpoint carries: unpickling it calls ``open(path, "w")``, which
    creates ``path`` (any other callable would run just as well)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parallel(1)
def test_a_checkpoint_that_would_run_code_is_refused_unread():
    with tempfile.TemporaryDirectory() as work:
        marker = os.path.join(work, "payload_ran")
        path = os.path.join(work, "checkpoint.pt")
        torch.save({"step": 3, "model": {"w": torch.ones(2)}, "config": Payload(marker)}, path)
        with pytest.raises(checkpoint.CheckpointError, match="not plain data"):
            checkpoint.load(path)
        assert not os.path.exists(marker), "loading the checkpoint ran its payload"


@pytest.mark.parallel(1)
def test_plain_state_round_trips_with_arrays_as_tensors():
    state = {"step": np.int64(4), "history": [{"loss": np.float32(0.5)}],
             "warm": [(b"key", {"0": np.arange(3.0)})], "model": {"w": torch.arange(2.0)}}
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "checkpoint.pt")
        checkpoint.save(path, state)
        back = checkpoint.load(path)
    assert back["step"] == 4 and isinstance(back["step"], int)
    assert back["history"][0]["loss"] == 0.5 and isinstance(back["history"][0]["loss"], float)
    key, entry = back["warm"][0]
    assert key == b"key" and torch.equal(entry["0"], torch.arange(3.0, dtype=torch.float64))
    restored = checkpoint.to_arrays(back["warm"])
    assert isinstance(restored[0][1]["0"], np.ndarray)
    assert np.array_equal(restored[0][1]["0"], np.arange(3.0))


@pytest.mark.parallel(1)
def test_an_older_checkpoint_names_its_conversion_which_makes_it_loadable():
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "checkpoint.pt")
        torch.save({"step": 2, "warm_starts": [(b"k", np.ones(3))]}, path)   # numpy inside
        with pytest.raises(checkpoint.CheckpointError, match="convert-checkpoint"):
            checkpoint.load(path)
        checkpoint.convert(path)
        state = checkpoint.load(path)
    assert state["step"] == 2 and torch.equal(state["warm_starts"][0][1],
                                              torch.ones(3, dtype=torch.float64))


@pytest.mark.parallel(1)
def test_a_missing_or_truncated_checkpoint_is_named():
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "checkpoint.pt")
        with pytest.raises(checkpoint.CheckpointError,
                           match="cannot read checkpoint .*checkpoint.pt"):
            checkpoint.load(path)
        checkpoint.save(path, {"step": 1})
        with open(path, "r+b") as f:
            f.truncate(20)
        with pytest.raises(checkpoint.CheckpointError, match="checkpoint.pt"):
            checkpoint.load(path)
