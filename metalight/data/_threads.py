"""Runs the many tiny tensor ops of task sampling on one intra-op thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["single_threaded"]


@contextmanager
def single_threaded() -> Iterator[None]:
    """Limits torch's intra-op parallelism of the calling thread to one thread for a block.

    Sampling a task runs a dozen ops on a few thousand elements each. Split over an OpenMP
    team they gain nothing, and on a busy machine waiting for a descheduled team member made
    a 5-way 1-shot Omniglot episode take milliseconds instead of ~0.1 ms. DataLoader workers
    already run single-threaded; this gives the main process the same behaviour. The
    previous setting is restored on exit (setting it costs well under a microsecond).
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
