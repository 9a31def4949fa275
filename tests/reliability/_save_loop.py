"""Saves ever newer ~32 MB checkpoints to one path until killed (for test_atomic_io.py).

``python tests/reliability/_save_loop.py {atomic,plain} PATH``: version ``k`` holds 64
tensors filled with ``k``; after each complete save, ``k`` is appended to ``PATH.done``.
``atomic`` saves through ``AtomicCheckpointIO``; ``plain`` calls ``torch.save(obj, PATH)``
directly, as a writer without the temporary-file-and-rename dance does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BLOCKS, BLOCK = 64, 131_072  # 64 x 512 KiB


def checkpoint(version: int) -> dict[str, object]:
    # Distinct tensors, each written as its own record: the file grows block by block.
    return {
        "version": version,
        "blocks": [torch.full((BLOCK,), float(version)) for _ in range(BLOCKS)],
    }


def main() -> None:
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode == "atomic":
        root = Path(__file__).resolve().parents[2]
        sys.path.insert(0, str(root))
        from metalight.lightning.checkpoint_io import AtomicCheckpointIO

        io = AtomicCheckpointIO()

        def save(obj: dict[str, object]) -> None:
            io.save_checkpoint(obj, path)

    else:

        def save(obj: dict[str, object]) -> None:
            torch.save(obj, path)

    with open(f"{path}.done", "a", buffering=1) as done:
        version = 1
        while True:
            save(checkpoint(version))
            done.write(f"{version}\n")
            version += 1


if __name__ == "__main__":
    main()
