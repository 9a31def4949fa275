"""Shared test configuration."""

from __future__ import annotations

import torch

# The test models are tiny: on a 2-core machine intra-op threads only add hand-off latency
# (measured here: a 10-task MLP meta-step took 160 ms with 2 threads, 22 ms with 1).
torch.set_num_threads(1)
