"""The README's promises: its commands are what CI runs, and its code examples run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert "metalight train +recipe=maml" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "the last step of .ci/run must be the README's test command"


def python_block(marker: str) -> str:
    (block,) = [b for b in code_blocks("python") if marker in b]
    return block


def test_higher_style_example_runs_and_fills_grads() -> None:
    namespace: dict = {}
    exec(compile(python_block("import metalight as higher"), "README-higher", "exec"), namespace)
    model = namespace["model"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The long-unroll example continues the same session.
    for p in model.parameters():
        p.grad = None
    exec(compile(python_block("diffopt.unroll("), "README-unroll", "exec"), namespace)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_custom_algorithm_example_is_short_and_trains() -> None:
    source = python_block("class SmoothedMAML")
    assert len(source.strip().splitlines()) < 30
    namespace: dict = {}
    exec(compile(source, "README-custom", "exec"), namespace)
    from metalight.data import Task, TaskBatch
    from metalight.models import MLP

    torch.manual_seed(0)
    module = namespace["SmoothedMAML"](MLP(2, (16,), 3), inner_steps=2)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(3):
        centers = torch.randn(3, 2, generator=g) * 3
        y = torch.arange(3).repeat_interleave(2)
        tasks.append(
            Task(
                centers[y] + 0.1 * torch.randn(6, 2, generator=g),
                y,
                centers[y] + 0.1 * torch.randn(6, 2, generator=g),
                y,
                torch.arange(3),
            )
        )
    module.training_step(TaskBatch.stack(tasks), 0).backward()
    body = module.model.features
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body.parameters())
