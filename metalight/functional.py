"""Stateless views of ``nn.Module``s with a history of fast weights.

A :class:`FunctionalModule` runs any ``torch.nn.Module`` with tensors it holds itself (the
*fast weights*). For each call they are put into the module's slots (one per attribute of
each module object, however many names reach it) and the module's own tensors are put back
afterwards, also on errors: the wrapped module is never changed by a view, a step or an
unroll (see ``docs/engine-invariant.md``). Its buffers (BatchNorm running statistics,
spectral norm's power-iteration vectors) are copied per view, so an inner loop can update
them without leaking into the model. Parameters are kept in the order of
``module.named_parameters()``, the order every optimizer of :mod:`metalight.optim` and every
``params=`` list uses. :func:`functional_call` is the same mechanism as a drop-in for
``torch.func.functional_call``.

Example:
    >>> import torch
    >>> from metalight.functional import monkeypatch
    >>> model = torch.nn.Linear(3, 1)
    >>> fmodel = monkeypatch(model, copy_initial_weights=False)
    >>> w, b = fmodel.parameters()
    >>> fmodel.update_params([w * 2, b])
    >>> fmodel(torch.ones(1, 3)).shape
    torch.Size([1, 1])
"""

from __future__ import annotations

import collections
import contextlib
import types
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["FunctionalModule", "ViewState", "functional_call", "make_functional", "monkeypatch"]

_OWN_ATTRS = frozenset({"_root", "_prefix"})
_MISSING = object()


class _Slot:
    """One place a tensor lives: attribute ``name`` of one module object.

    A module object used at several places of the model is one slot per attribute, however
    many names reach it, so it is swapped and restored exactly once.
    """

    __slots__ = ("index", "is_param", "module", "name")

    def __init__(self, module: nn.Module, name: str, is_param: bool, index: int) -> None:
        # A weak reference: the layout cache must not keep the user's model alive.
        self.module = weakref.ref(module)
        self.name = name
        self.is_param = is_param
        self.index = index


class _Walk:
    """Every module, parameter and buffer of a model, in ``named_*(remove_duplicate=False)``
    order, gathered without building names (this runs once per view)."""

    __slots__ = ("buffers", "params", "signature")

    def __init__(self, module: nn.Module) -> None:
        params: list[Tensor] = []
        buffers: list[Tensor] = []
        signature: list[int] = []
        stack = [module]
        while stack:
            sub = stack.pop()
            signature.append(id(sub))
            for p in sub._parameters.values():
                if p is not None:
                    params.append(p)
                    signature.append(id(p))
            signature.append(-1)
            for t in sub._buffers.values():
                if t is not None:
                    buffers.append(t)
                    signature.append(id(t))
            signature.append(-2)
            stack.extend(reversed([c for c in sub._modules.values() if c is not None]))
        self.params = params
        self.buffers = buffers
        self.signature = signature


class _Layout:
    """Names, shapes, aliases and slots of a module's tensors: static between unrolls."""

    def __init__(self, module: nn.Module, walk: _Walk) -> None:
        self.signature = walk.signature
        entries = list(module.named_parameters(remove_duplicate=False))
        canonical: dict[int, int] = {}
        self.unique_pos: list[int] = []
        # Every name a parameter is reachable under (tied weights and shared modules have
        # several), so a submodule view finds a weight whose first name lies outside it.
        self.aliases: dict[str, int] = {}
        for pos, (name, p) in enumerate(entries):
            index = canonical.get(id(p))
            if index is None:
                index = canonical[id(p)] = len(self.unique_pos)
                self.unique_pos.append(pos)
            self.aliases[name] = index
        self.names = [entries[pos][0] for pos in self.unique_pos]
        self.shapes = [entries[pos][1].shape for pos in self.unique_pos]

        buffer_index: dict[int, int] = {}
        self.buffer_pos: list[int] = []
        self.buffer_names: list[str] = []
        self.buffer_aliases: dict[str, int] = {}
        for pos, (name, t) in enumerate(module.named_buffers(remove_duplicate=False)):
            index = buffer_index.get(id(t))
            if index is None:
                index = buffer_index[id(t)] = len(self.buffer_names)
                self.buffer_names.append(name)
                self.buffer_pos.append(pos)
            self.buffer_aliases[name] = index

        self.slots: list[_Slot] = []
        # Plain attributes a forward pass may point at fast weights, put back after each call:
        # an RNN's cached weight list, and tensors kept outside _parameters/_buffers (the
        # deprecated torch.nn.utils.weight_norm recomputes ``weight`` in a pre-hook).
        self.attrs: list[tuple[weakref.ReferenceType[nn.Module], tuple[str, ...]]] = []
        seen: set[int] = set()
        for _, sub in module.named_modules(remove_duplicate=False):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            for name, p in sub._parameters.items():
                if p is not None:
                    self.slots.append(_Slot(sub, name, True, canonical[id(p)]))
            for name, t in sub._buffers.items():
                if t is not None:
                    self.slots.append(_Slot(sub, name, False, buffer_index[id(t)]))
            names = [n for n, v in vars(sub).items() if isinstance(v, Tensor)]
            if isinstance(sub, nn.RNNBase):
                names += ["_flat_weights", "_flat_weight_refs"]
            if names:
                self.attrs.append((weakref.ref(sub), tuple(names)))
        self.views: dict[str, dict[str, int]] = {}


# Building a view is on the hot path (one per task per meta-iteration): the module's layout
# is computed once and revalidated against the identities of its modules and tensors.
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout(module: nn.Module) -> tuple[_Layout, list[Tensor], list[Tensor]]:
    """The module's layout, its distinct parameters and its distinct buffers."""
    walk = _Walk(module)
    layout = _LAYOUTS.get(module)
    if layout is not None and layout.signature == walk.signature:
        params = [walk.params[pos] for pos in layout.unique_pos]
        if all(p.shape == s for p, s in zip(params, layout.shapes, strict=True)):
            return layout, params, [walk.buffers[pos] for pos in layout.buffer_pos]
    layout = _Layout(module, walk)
    _LAYOUTS[module] = layout
    params = [walk.params[pos] for pos in layout.unique_pos]
    return layout, params, [walk.buffers[pos] for pos in layout.buffer_pos]


@contextlib.contextmanager
def _swapped(layout: _Layout, params: Sequence[Tensor], buffers: list[Tensor]) -> Iterator[None]:
    """Put ``params`` and ``buffers`` into the module for one call, then put the originals back.

    ``torch.func.functional_call(..., tie_weights=True)`` restores the wrong tensors when one
    module object is reachable under several names (it swaps the same attribute twice and
    restores in the same order), leaving fast weights inside the user's module. Here every
    (module object, attribute) slot is swapped exactly once and all are restored in reverse
    order, on exceptions too. A buffer the forward pass *reassigns* (rather than updates in
    place) is kept in ``buffers``, as ``functional_call`` does.
    """
    saved: list[tuple[dict[str, Any], str, Any]] = []
    attrs: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for slot in layout.slots:
            module = slot.module()
            if module is None:
                raise RuntimeError("a submodule of the functional view's module was deleted")
            # _parameters holds Parameters by type, but a view puts plain tensors there.
            table: dict[str, Any] = module._parameters if slot.is_param else module._buffers
            value = params[slot.index] if slot.is_param else buffers[slot.index]
            saved.append((table, slot.name, table[slot.name]))
            table[slot.name] = value
        # An RNN's forward rebuilds its cached weight list when it sees new tensors (as under
        # functional_call); the module gets its own list back, holding no fast weight.
        for ref, names in layout.attrs:
            sub = ref()
            if sub is not None:
                own = vars(sub)
                attrs.extend((own, name, own.get(name, _MISSING)) for name in names)
        yield
    finally:
        for (table, name, original), slot in zip(
            reversed(saved), reversed(layout.slots[: len(saved)]), strict=True
        ):
            if not slot.is_param:
                current = table[name]
                if current is not buffers[slot.index] and current is not None:
                    buffers[slot.index] = current
            table[name] = original
        for own, name, value in reversed(attrs):
            if value is _MISSING:
                own.pop(name, None)
            else:
                own[name] = value


class _Root:
    """State shared by a functional view and the views of its submodules."""

    def __init__(
        self,
        module: nn.Module,
        params: list[Tensor] | None,
        track_higher_grads: bool,
        device: torch.device | str | None,
        layout: tuple[_Layout, list[Tensor], list[Tensor]] | None = None,
    ) -> None:
        self.module = module
        self.layout, self.module_params, buffers = layout or _layout(module)
        self.names = self.layout.names
        self.aliases = self.layout.aliases
        self.shapes = self.layout.shapes
        # The view's own copy of each distinct buffer (a shared module's buffer is one).
        self.buffers: list[Tensor] = []
        for t in buffers:
            copy = t.detach().clone()
            self.buffers.append(copy.to(device) if device is not None else copy)
        self.history: list[list[Tensor]] = []
        self.track_higher_grads = track_higher_grads
        self.training: dict[str, bool] = {}
        self._views = self.layout.views
        if params is not None:
            self.update(params)

    def update(self, params: Iterable[Tensor]) -> None:
        params = list(params)
        if len(params) != len(self.names):
            raise ValueError(
                f"expected {len(self.names)} fast weights, one per parameter of "
                f"{type(self.module).__name__} in named_parameters() order "
                f"({', '.join(self.names[:4])}{', ...' if len(self.names) > 4 else ''}), "
                f"got {len(params)}"
            )
        for name, shape, p in zip(self.names, self.shapes, params, strict=True):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"fast weight for {name!r} must be a Tensor, got {type(p).__name__}"
                )
            if p.shape != shape:
                raise ValueError(
                    f"fast weight for {name!r} has shape {tuple(p.shape)}, "
                    f"the module's parameter has shape {tuple(shape)}"
                )
        if self.track_higher_grads or not self.history:
            self.history.append(params)
        else:
            # Without higher-order tracking only the initial and the latest weights are kept,
            # so memory does not grow with the number of steps.
            del self.history[1:]
            self.history.append(params)

    def latest(self) -> list[Tensor]:
        if not self.history:
            raise ValueError(
                "this functional module holds no fast weights yet: pass params=[...] to the "
                "call, call update_params(...), or build it with monkeypatch(module)"
            )
        return self.history[-1]

    def replace(self, index: int, value: Tensor) -> None:
        params = list(self.latest())
        params[index] = value
        self.history[-1] = params

    def view_names(self, prefix: str) -> dict[str, int]:
        names = self._views.get(prefix)
        if names is None:
            cut = len(prefix) + 1
            names = {n[cut:]: i for n, i in self.aliases.items() if n.startswith(prefix + ".")}
            self._views[prefix] = names
        return names

    @contextlib.contextmanager
    def modes(self, module: nn.Module, prefix: str) -> Iterator[None]:
        """Apply the view's own train/eval modes to the module for one call, then restore."""
        if not self.training:
            yield
            return
        saved = []
        for name, sub in module.named_modules(prefix=prefix):
            mode = self._mode_of(name)
            if mode is not None and sub.training != mode:
                saved.append((sub, sub.training))
                sub.training = mode
        try:
            yield
        finally:
            for sub, mode in saved:
                sub.training = mode

    def _mode_of(self, name: str) -> bool | None:
        while True:
            if name in self.training:
                return self.training[name]
            if not name:
                return None
            name = name.rpartition(".")[0]


class ViewState(NamedTuple):
    """What a view's calls depend on besides the fast weights (see
    :meth:`FunctionalModule.view_state`).

    Attributes:
        buffers: copies of the view's buffers, in ``named_buffers()`` order.
        modes: the train/eval mode of every submodule, by ``named_modules()`` name.
    """

    buffers: list[Tensor]
    modes: dict[str, bool]


class FunctionalModule:
    """A stateless view of an ``nn.Module`` holding its own fast weights.

    Calling it runs the wrapped module with the latest fast weights; ``fmodel(x, params=p)``
    first makes ``p`` the latest fast weights (higher's semantics). Submodules are views too
    (``fmodel.encoder(x)``), parameters read and assigned as attributes are the fast weights
    (``fmodel.head.weight = w * mask`` is tracked by autograd), and methods defined on the
    module's class run against the view.

    Build one with :func:`monkeypatch` (or :func:`metalight.innerloop_ctx`).

    Example:
        >>> import torch
        >>> from metalight.functional import monkeypatch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> fnet = monkeypatch(net, copy_initial_weights=False)
        >>> loss = fnet(torch.randn(8, 2)).pow(2).mean()
        >>> grads = torch.autograd.grad(loss, fnet.fast_params, create_graph=True)
        >>> fnet.update_params([p - 0.1 * g for p, g in zip(fnet.fast_params, grads)])
        >>> len(list(fnet.parameters(time=0))), len(fnet.fast_params)
        (4, 4)
    """

    # Set with object.__setattr__ (the view's own __setattr__ assigns fast weights); declared
    # here so that their types are known rather than those of __getattr__.
    _root: _Root
    _prefix: str

    def __init__(self, root: _Root, prefix: str = "") -> None:
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_prefix", prefix)

    # --- calling -------------------------------------------------------------------------
    def __call__(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        root = self._root
        if params is not None:
            root.update(params)
        module = self.module
        # The whole model's tensors are swapped even for a submodule view: a weight it shares
        # with a module outside it is then the same fast weight on both sides.
        with root.modes(module, self._prefix), _swapped(root.layout, root.latest(), root.buffers):
            return module(*args, **kwargs)

    def call(self, params: Sequence[Tensor], *args: Any, **kwargs: Any) -> Any:
        """Run with ``params`` as the fast weights for this call only (history untouched).

        ``params`` are the whole model's fast weights, in ``named_parameters()`` order.
        """
        root = self._root
        if len(params) != len(root.names):
            root.update(params)  # raises the explanatory error
        saved = root.history
        root.history = [list(params)]
        try:
            return self(*args, **kwargs)
        finally:
            root.history = saved

    def forward(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        """Same as calling the view."""
        return self(*args, params=params, **kwargs)

    def boxed_forward(
        self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any
    ) -> Any:
        """Same as calling the view (higher's patched modules have this name too)."""
        return self(*args, params=params, **kwargs)

    # --- fast weights ----------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The wrapped module (for a submodule view, that submodule)."""
        root = self._root
        return root.module.get_submodule(self._prefix) if self._prefix else root.module

    @property
    def parameter_names(self) -> list[str]:
        """Names of the fast weights (``named_parameters()`` of the whole module)."""
        return self._root.names

    @property
    def module_parameters(self) -> list[Tensor]:
        """The wrapped module's own parameters, in fast-weight order."""
        self._require_root("module_parameters")
        return self._root.module_params

    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights, in ``named_parameters()`` order (None before any)."""
        self._require_root("fast_params")
        return self._root.history[-1] if self._root.history else None

    @fast_params.setter
    def fast_params(self, value: Iterable[Tensor]) -> None:
        self.update_params(value)

    @property
    def init_fast_params(self) -> list[Tensor] | None:
        """The fast weights the unroll started from (time 0)."""
        self._require_root("init_fast_params")
        return self._root.history[0] if self._root.history else None

    @property
    def _fast_params(self) -> list[list[Tensor]]:
        """The whole history of fast weights, oldest first (higher's private name for it)."""
        self._require_root("_fast_params")
        return self._root.history

    @property
    def track_higher_grads(self) -> bool:
        """Whether the whole history of fast weights is kept for higher-order gradients."""
        return self._root.track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        self._root.track_higher_grads = bool(value)

    def update_params(self, params: Iterable[Tensor]) -> None:
        """Append ``params`` to the history and make them the latest fast weights.

        Raises:
            ValueError: if the number or shapes of ``params`` do not match the module's.
        """
        self._require_root("update_params")
        self._root.update(params)

    def parameters(self, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights at step ``time`` (latest when None; ``time=0`` the initial ones).

        Raises:
            ValueError: for a step that was not kept (without ``track_higher_grads`` only
                the initial and the latest weights are).
        """
        history = self._root.history
        if not history:
            self._root.latest()
        if time is None:
            params = history[-1]
        elif not self._root.track_higher_grads and time not in (0, -1):
            raise ValueError(
                f"parameters(time={time}) is not available: with track_higher_grads=False only "
                "time=0 (initial) and the latest weights are kept"
            )
        else:
            try:
                params = history[time]
            except IndexError:
                raise ValueError(
                    f"parameters(time={time}): only {len(history)} steps of fast weights exist "
                    f"(times 0..{len(history) - 1})"
                ) from None
        if self._prefix:
            params = [
                params[i] for i in dict.fromkeys(self._root.view_names(self._prefix).values())
            ]
        return iter(params)

    def named_parameters(self, time: int | None = None) -> Iterator[tuple[str, Tensor]]:
        """Names and fast weights at step ``time``, like ``nn.Module.named_parameters``."""
        if self._prefix:
            first_names: dict[int, str] = {}
            for rel, i in self._root.view_names(self._prefix).items():
                first_names.setdefault(i, rel)
            return zip(first_names.values(), self.parameters(time), strict=True)
        return zip(self._root.names, self.parameters(time), strict=True)

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        """This view's own copies of the module's buffers (each distinct buffer once)."""
        root = self._root
        if not self._prefix:
            return zip(root.layout.buffer_names, root.buffers, strict=True)
        start = self._prefix + "."
        cut = len(start)
        first: dict[int, str] = {}
        for name, index in root.layout.buffer_aliases.items():
            if name.startswith(start):
                first.setdefault(index, name[cut:])
        return iter([(name, root.buffers[index]) for index, name in first.items()])

    def buffers(self) -> Iterator[Tensor]:
        """This view's own copies of the module's buffers."""
        return (b for _, b in self.named_buffers())

    def state_dict(
        self,
        *,
        destination: dict[str, Any] | None = None,
        prefix: str = "",
        keep_vars: bool = False,
    ) -> dict[str, Any]:
        """The module's ``state_dict`` keys holding this view's latest fast weights and buffers.

        As in higher, ``model.load_state_dict(fmodel.state_dict())`` keeps what the inner
        loop learned. The module is only read: its own weights and buffers stay as they are.
        Entries that are neither a parameter nor a buffer (a module's extra state) are the
        module's own.

        Args:
            destination: a dict to fill and return (a new ordered dict when None).
            prefix: prepended to every key.
            keep_vars: False (the default, as ``nn.Module.state_dict``) gives detached
                tensors; True gives the fast weights themselves, graph and all.

        Returns:
            The filled ``destination``.

        Raises:
            ValueError: if the view holds no fast weights yet.

        Example:
            >>> import torch
            >>> from metalight.functional import monkeypatch
            >>> model = torch.nn.Linear(2, 1)
            >>> fmodel = monkeypatch(model)
            >>> fmodel.update_params([p + 1 for p in fmodel.parameters()])
            >>> torch.equal(fmodel.state_dict()["bias"], model.bias.detach() + 1)
            True
        """
        root = self._root
        params = root.latest()
        out: dict[str, Any] = collections.OrderedDict() if destination is None else destination
        start = self._prefix + "." if self._prefix else ""
        # keep_vars=True: the module's own tensors, only used for their keys and extra state.
        for key, value in self.module.state_dict(keep_vars=True).items():
            index = root.aliases.get(start + key)
            if index is not None:
                value = params[index]
            else:
                buffer = root.layout.buffer_aliases.get(start + key)
                if buffer is not None:
                    value = root.buffers[buffer]
            if isinstance(value, Tensor) and not keep_vars:
                value = value.detach()
            out[prefix + key] = value
        return out

    def to(self, *args: Any, **kwargs: Any) -> FunctionalModule:
        """Move or cast the view's fast weights and buffers (as ``Tensor.to``); returns the view.

        The wrapped module is not moved: a higher patched module returns itself from ``to``,
        and this view never changes the module it views. The latest fast weights are
        replaced by their moved copies (differentiably, as ``Tensor.to`` is; no step is
        added to the history); a dtype casts only floating-point tensors, as in
        ``nn.Module.to``.

        Example:
            >>> import torch
            >>> from metalight.functional import monkeypatch
            >>> model = torch.nn.Linear(2, 1)
            >>> fmodel = monkeypatch(model).to(torch.float64)
            >>> fmodel.bias.dtype, model.bias.dtype
            (torch.float64, torch.float32)
        """
        self._require_root("to")
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)

        def move(t: Tensor) -> Tensor:
            # As nn.Module.to: a dtype casts only floating-point and complex tensors, so
            # BatchNorm's integer step counter stays an integer.
            floating = t.is_floating_point() or t.is_complex()
            cast = dtype if floating else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)

        root = self._root
        if root.history:
            # The latest step is replaced rather than a new one added: a move is no step.
            root.history[-1] = [move(p) for p in root.history[-1]]
        root.buffers[:] = [move(b) for b in root.buffers]
        return self

    def view_state(self) -> ViewState:
        """Copies of what the view's calls depend on besides the fast weights, as they are now.

        That is the buffers (a forward pass in train mode moves BatchNorm running statistics
        and spectral norm's power-iteration vectors in place) and the train/eval mode of
        each submodule. :meth:`replaying` runs calls on them again: a checkpointed unroll
        recomputes a step in the backward pass as its forward pass ran.
        """
        self._require_root("view_state")
        root = self._root
        modes = {}
        for name, sub in root.module.named_modules():
            mode = root._mode_of(name)
            modes[name] = sub.training if mode is None else mode
        return ViewState([b.detach().clone() for b in root.buffers], modes)

    @contextlib.contextmanager
    def replaying(self, state: ViewState) -> Iterator[None]:
        """Run the calls inside on copies of ``state``'s buffers and in its modes.

        Afterwards the view has its own buffers and modes back, whatever the calls did;
        ``state`` is not changed, so it can be replayed again.

        Raises:
            ValueError: for a ``state`` that is not this view's (from :meth:`view_state`).
        """
        self._require_root("replaying")
        root = self._root
        if not isinstance(state, ViewState) or [b.shape for b in state.buffers] != [
            b.shape for b in root.buffers
        ]:
            raise ValueError(
                "replaying needs a ViewState taken from this view with view_state(), got "
                f"{type(state).__name__}"
            )
        buffers, training = list(root.buffers), root.training
        root.buffers[:] = [b.clone() for b in state.buffers]
        root.training = dict(state.modes)
        try:
            yield
        finally:
            root.buffers[:] = buffers
            root.training = training

    def copy_buffers_to_module(self) -> None:
        """Write this view's buffers (e.g. BatchNorm running statistics) into the module.

        Nothing an unroll does reaches the module's buffers unless this is called.
        """
        root = self._root
        own = dict(root.module.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for name, b in zip(root.layout.buffer_names, root.buffers, strict=True):
                own[name].copy_(b)

    def copy_buffers_from(
        self, module: nn.Module, device: torch.device | str | None = None
    ) -> None:
        """Replace this view's buffer copies with fresh copies of ``module``'s buffers."""
        self._require_root("copy_buffers_from")
        root = self._root
        buffers = dict(module.named_buffers(remove_duplicate=False))
        missing = [n for n in root.layout.buffer_names if n not in buffers]
        if missing:
            raise ValueError(
                f"{type(module).__name__} lacks buffers {sorted(missing)} of the functional view"
            )
        for index, name in enumerate(root.layout.buffer_names):
            copy = buffers[name].detach().clone()
            root.buffers[index] = copy.to(device) if device is not None else copy

    # --- modes -----------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """The view's train/eval mode (the module's own until ``train``/``eval`` is called)."""
        mode = self._root._mode_of(self._prefix)
        return self.module.training if mode is None else mode

    def train(self, mode: bool = True) -> FunctionalModule:
        """Set the train/eval mode of this view without touching the wrapped module."""
        training = self._root.training
        for name in list(training):
            if self._prefix == "" or name == self._prefix or name.startswith(self._prefix + "."):
                del training[name]
        training[self._prefix] = bool(mode)
        return self

    def eval(self) -> FunctionalModule:
        """Same as ``train(False)``."""
        return self.train(False)

    # --- attribute access --------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        root = self._root
        full = f"{self._prefix}.{name}" if self._prefix else name
        index = root.aliases.get(full)
        if index is not None:
            return root.latest()[index]
        buffer = root.layout.buffer_aliases.get(full)
        if buffer is not None:
            return root.buffers[buffer]
        attr = getattr(self.module, name)
        if isinstance(attr, nn.Module):
            return FunctionalModule(root, full)
        # Methods written on the user's class run against the view, so that what they read
        # through ``self`` is the fast weights; nn.Module's own machinery does not.
        if (
            isinstance(attr, types.MethodType)
            and attr.__self__ is self.module
            and getattr(nn.Module, name, None) is not attr.__func__
        ):
            return types.MethodType(attr.__func__, self)
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        root = self._root
        full = f"{self._prefix}.{name}" if self._prefix else name
        index = root.aliases.get(full)
        if index is not None:
            if not isinstance(value, Tensor) or value.shape != root.shapes[index]:
                raise ValueError(
                    f"cannot assign {type(value).__name__} to fast weight {full!r}: expected a "
                    f"Tensor of shape {tuple(root.shapes[index])}"
                )
            root.replace(index, value)
            return
        buffer = root.layout.buffer_aliases.get(full)
        if buffer is not None:
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"cannot assign {type(value).__name__} to buffer {full!r}: expected a Tensor"
                )
            root.buffers[buffer] = value
        elif name in _OWN_ATTRS or isinstance(getattr(type(self), name, None), property):
            # The view's own settable attributes (fast_params, track_higher_grads): higher
            # lets users assign them.
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(
                f"cannot set {name!r} on a functional view: only parameters and buffers of "
                f"{type(self.module).__name__} can be assigned"
            )

    def __getitem__(self, idx: int | str) -> FunctionalModule:
        sub = self.module[idx]  # type: ignore[index]
        for name, child in self.module.named_children():
            if child is sub:
                return FunctionalModule(
                    self._root, f"{self._prefix}.{name}" if self._prefix else name
                )
        raise KeyError(idx)

    def __len__(self) -> int:
        return len(self.module)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[FunctionalModule]:
        for name, _ in self.module.named_children():
            yield FunctionalModule(self._root, f"{self._prefix}.{name}" if self._prefix else name)

    def __repr__(self) -> str:
        steps = len(self._root.history)
        return f"FunctionalModule({self.module!r}, steps={steps})"

    def _require_root(self, what: str) -> None:
        if self._prefix:
            raise AttributeError(
                f"{what} belongs to the whole functional model, not to its submodule view "
                f"{self._prefix!r}"
            )


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
    *,
    detach_initial_weights: bool | None = None,
) -> FunctionalModule:
    """Make a functional view of ``module`` that starts from its current weights.

    Args:
        module: any ``nn.Module``; it is never modified by the view.
        device: if given, the fast weights and buffer copies live on this device.
        copy_initial_weights: higher's name for ``detach_initial_weights``.
        track_higher_grads: keep the graph of every step for higher-order gradients. With
            False the view is a cheap test-mode unroll.
        detach_initial_weights: the clearer name. True: the unroll starts from detached
            copies, so meta-gradients land on ``fmodel.parameters(time=0)`` and not on
            ``module.parameters()``. False (what MAML wants): the unroll starts from the
            module's parameters themselves, so ``meta_loss.backward()`` fills
            ``module.parameters()``'s ``.grad``. Overrides ``copy_initial_weights``.

    Returns:
        The :class:`FunctionalModule`.

    Example:
        >>> import torch
        >>> from metalight.functional import monkeypatch
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = monkeypatch(model, detach_initial_weights=False)
        >>> fmodel(torch.randn(4, 2)).sum().backward()
        >>> model.weight.grad is not None
        True
    """
    detach = copy_initial_weights if detach_initial_weights is None else detach_initial_weights
    layout = _layout(module)
    params = layout[1]
    if detach:
        params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    if device is not None:
        params = [p.to(device) for p in params]
    return FunctionalModule(_Root(module, list(params), track_higher_grads, device, layout))


def make_functional(module: nn.Module) -> FunctionalModule:
    """A functional view holding no fast weights: pass ``params=`` on the first call.

    Example:
        >>> import torch
        >>> from metalight.functional import make_functional
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = make_functional(model)
        >>> out = fmodel(torch.randn(3, 2), params=[p * 2 for p in model.parameters()])
    """
    return FunctionalModule(_Root(module, None, True, None))


def functional_call(
    module: nn.Module,
    tensors: Mapping[str, Tensor | None],
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``torch.func.functional_call`` that is right for every model structure.

    Runs ``module(*args, **kwargs)`` with the parameters and buffers named in ``tensors``
    (any name a tensor is reachable under; tied weights and a module object used at several
    places take the one value) and the module's own tensors for the rest, then restores the
    module exactly, also on errors. Unlike ``torch.func.functional_call(..., tie_weights=True)``
    it leaves no given tensor inside a module object reachable under several names. A buffer
    may be given as None (e.g. BatchNorm running statistics, to normalise with batch
    statistics only). Works under ``torch.func.vmap``.

    Args:
        module: any ``nn.Module``.
        tensors: replacement tensors by ``named_parameters()``/``named_buffers()`` name.
        args: positional arguments of the call (a single tensor is taken as ``(tensor,)``).
        kwargs: keyword arguments of the call.

    Returns:
        What ``module`` returns.

    Raises:
        KeyError: a name that is neither a parameter nor a buffer of ``module``.

    Example:
        >>> import torch
        >>> from metalight.functional import functional_call
        >>> proj = torch.nn.Linear(2, 2)
        >>> model = torch.nn.Sequential(proj, torch.nn.Tanh(), proj)
        >>> out = functional_call(model, {"0.weight": torch.eye(2)}, (torch.ones(1, 2),))
        >>> model[0].weight is proj.weight and model[2].weight.grad_fn is None
        True
    """
    layout, own_params, own_buffers = _layout(module)
    # ``tensors`` may map a name to None (a buffer: normalise with batch statistics only).
    params: list[Any] = list(own_params)
    buffers: list[Any] = list(own_buffers)
    for name, value in tensors.items():
        index = layout.aliases.get(name)
        if index is not None:
            params[index] = value
            continue
        index = layout.buffer_aliases.get(name)
        if index is None:
            raise KeyError(
                f"{name!r} is neither a parameter nor a buffer of {type(module).__name__} "
                "(use names from named_parameters() or named_buffers())"
            )
        buffers[index] = value
    if isinstance(args, Tensor):
        args = (args,)
    with _swapped(layout, params, buffers):
        return module(*args, **(kwargs or {}))
