"""The model structures users build, for the engine's differential tests.

Each :class:`Structure` builds a small float64 model and its data, and says how one forward
pass runs through a ``run(path, x)`` callable (``path`` names the submodule to call, ``""``
the whole model), so the same structure runs on the user's module, on a ``copy.deepcopy``
stepped by ``torch.optim``, on a functional view and on the hand-written reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

__all__ = ["STRUCTURES", "Run", "Structure"]

Run = Callable[[str, Tensor], Tensor]


def _whole(run: Run, x: Tensor) -> Tensor:
    return run("", x)


@dataclasses.dataclass(frozen=True)
class Structure:
    """One model structure of the zoo.

    Attributes:
        name: shown in test ids and failure messages.
        build: makes the float64 model (seeded by the caller).
        inputs: makes ``(x, y)`` for ``n`` examples from a generator.
        call: one forward pass as a function of ``run`` and ``x``.
        maml: whether ``MetaLearningModule`` can train it (its forward returns a tensor and
            ``call`` is the plain forward).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    call: Callable[[Run, Tensor], Tensor] = _whole
    maml: bool = True


def _dense(features: int, out: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    def make(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, features, generator=gen, dtype=torch.float64)
        return x, torch.randn(n, out, generator=gen, dtype=torch.float64)

    return make


def _sequence(features: int, out: int) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    def make(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 4, features, generator=gen, dtype=torch.float64)
        return x, torch.randn(n, out, generator=gen, dtype=torch.float64)

    return make


def _tokens(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    # Only tokens 0..5 of 8 occur: the other embedding rows get exactly zero gradient,
    # where an adaptive optimizer's square root must not produce NaN meta-gradients.
    x = torch.randint(0, 6, (n, 3), generator=gen)
    return x, torch.randn(n, 3, 8, generator=gen, dtype=torch.float64)


def _images(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 1, 5, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, 2, generator=gen, dtype=torch.float64)


class _TwoEncoders(nn.Module):
    """Two encoders sharing one ``nn.Linear`` object."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(3, 4)
        self.enc_a = nn.Sequential(shared, nn.Tanh())
        self.enc_b = nn.Sequential(shared, nn.Sigmoid(), nn.Linear(4, 4))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.enc_a(x), self.enc_b(x)], dim=-1))


def _nested_sharing() -> nn.Module:
    inner = nn.Linear(4, 4)
    block = nn.Sequential(inner, nn.Tanh(), inner)
    return nn.Sequential(nn.Linear(3, 4), block, nn.Tanh(), block, nn.Linear(4, 2))


class _Recurrence(nn.Module):
    """One block applied in a loop: weights shared across the iterations of forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.cell = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        u = self.inp(x)
        h = torch.tanh(u)
        for _ in range(3):
            h = torch.tanh(self.cell(h) + u)
        return self.out(h)


class _TiedEmbedding(nn.Module):
    """Embedding and output weight tying (one Parameter in two modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.mix = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 8)
        self.decode.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(torch.tanh(self.mix(self.embed(x))))


class _Branch(nn.Module):
    """A branch not taken: ``aux``'s parameters get no gradient at all."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(3, 2)
        self.aux = nn.Linear(3, 2)
        self.use_aux = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.main(x)
        return out + self.aux(x) if self.use_aux else torch.tanh(out)


class _Unused(nn.Module):
    """A registered parameter that forward never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    return model


def _conv_batchnorm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)
    )


class _Recurrent(nn.Module):
    """An ``nn.RNNBase`` module (cached flat weights) under a linear head."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _Cells(nn.Module):
    """LSTMCell and GRUCell stepped by hand over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(3, 4)
        self.gru = nn.GRUCell(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = c = x.new_zeros(x.shape[0], 4)
        g = x.new_zeros(x.shape[0], 3)
        for t in range(x.shape[1]):
            h, c = self.lstm(x[:, t], (h, c))
            g = self.gru(h, g)
        return self.head(g)


class _Containers(nn.Module):
    """ModuleList and ModuleDict iterated in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 4)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return sum(head(x) for head in self.heads.values())  # type: ignore[return-value]


class _CustomForward(nn.Module):
    """A forward that calls the class's own methods, which read submodules and parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 1.0, 2.0]))
        self.head = nn.Linear(4, 2)

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.encoder(x)) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x) + self.features(x * 0.5))


class _EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def _submodule_calls(run: Run, x: Tensor) -> Tensor:
    # Called as ``fmodel.head(fmodel.encoder(x))``, not through the model's forward.
    return run("head", run("encoder", x))


def _rnn_root_call(run: Run, x: Tensor) -> Tensor:
    out, _ = run("", x)  # type: ignore[misc]
    return out[:, -1, :2]


def _shared_module() -> nn.Module:
    proj = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(3, 4), proj, nn.Tanh(), nn.Linear(4, 4), proj, nn.Linear(4, 2))


STRUCTURES: list[Structure] = [
    Structure(
        "mlp", lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), _dense(3, 2)
    ),
    Structure("shared_module", _shared_module, _dense(3, 2)),
    Structure("shared_encoders", _TwoEncoders, _dense(3, 2)),
    Structure("nested_sharing", _nested_sharing, _dense(3, 2)),
    Structure("loop_recurrence", _Recurrence, _dense(3, 2)),
    Structure("tied_embedding", _TiedEmbedding, _tokens),
    Structure(
        "weight_norm",
        lambda: nn.Sequential(
            parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
        ),
        _dense(3, 2),
    ),
    Structure(
        "spectral_norm",
        lambda: nn.Sequential(
            parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
        ),
        _dense(3, 2),
    ),
    Structure(
        "orthogonal",
        lambda: nn.Sequential(
            parametrizations.orthogonal(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2)
        ),
        _dense(4, 2),
    ),
    Structure("branch_not_taken", _Branch, _dense(3, 2)),
    Structure("unused_parameter", _Unused, _dense(3, 2)),
    Structure("frozen", _frozen, _dense(3, 2)),
    Structure("conv_batchnorm", _conv_batchnorm, _images),
    Structure("lstm", lambda: _Recurrent(nn.LSTM(3, 4, batch_first=True)), _sequence(3, 2)),
    Structure(
        "gru_2layer",
        lambda: _Recurrent(nn.GRU(3, 4, num_layers=2, batch_first=True)),
        _sequence(3, 2),
    ),
    Structure("rnn", lambda: _Recurrent(nn.RNN(3, 4, batch_first=True)), _sequence(3, 2)),
    Structure(
        "rnn_root",
        lambda: nn.LSTM(3, 4, batch_first=True),
        _sequence(3, 2),
        call=_rnn_root_call,
        maml=False,
    ),
    Structure("lstm_gru_cells", _Cells, _sequence(3, 2)),
    Structure("module_list_dict", _Containers, _dense(3, 2)),
    Structure("custom_forward", _CustomForward, _dense(3, 2)),
    Structure("submodule_calls", _EncoderHead, _dense(3, 2), call=_submodule_calls, maml=False),
]
"""Every structure of the zoo."""
