"""The progress record that says a job runs again from a checkpoint carries where the checkpoint
left it (epoch, tokens, loss), read from the checkpoint's header, not zeros."""

from __future__ import annotations

import random

import torch

from loquetier.lora import tensor_io
from loquetier.workers.jobs import _resumed_at


def test_a_resumed_jobs_progress_comes_from_its_checkpoint_header() -> None:
    rng = random.Random()
    epoch, tokens, loss = rng.randrange(1, 9), rng.randrange(1, 10**6), rng.random() * 3
    blob = tensor_io.pack({"rng": torch.zeros(2)}, {"kind": "checkpoint", "step": 4, "cursor": [epoch, 3],
                                                   "metrics": {"num_tokens": tokens, "losses": [9.0, loss]}})
    assert _resumed_at(blob) == {"epoch": float(epoch), "tokens_processed": tokens, "loss": loss}
    no_steps = tensor_io.pack({}, {"cursor": [0, 0], "metrics": {"num_tokens": 0, "losses": []}})
    assert _resumed_at(no_steps) == {"epoch": 0.0, "tokens_processed": 0, "loss": None}
    assert _resumed_at(None) == {}
    assert _resumed_at(b'{"step": 2}') == {}  # not a checkpoint of ours: the record keeps its defaults
    assert _resumed_at(tensor_io.pack({}, {"cursor": "x"})) == {}
