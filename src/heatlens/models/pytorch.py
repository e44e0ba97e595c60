"""PyTorch models the user already has: a ``torch.export`` program file or a ``package.module:function``.

``load_model("model.pt2")`` loads an ``ExportedProgram`` (``torch.export.save``) and explains its
``.module()``; ``load_model("mypkg.models:build")`` imports ``mypkg.models``, calls ``build()`` and
wraps the ``nn.Module`` (or ``Classifier``) it returns. ``weights=FILE`` loads a state dict into the
module with ``torch.load(FILE, weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..validation import did_you_mean
from .adapter import Classifier, wrap

# "package.module:function": dotted identifiers, a colon, one identifier (uvicorn / entry-point style)
FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_factory(spec: str) -> bool:
    """True for ``"package.module:function"`` (and not an existing file such as ``C:model``)."""
    return bool(FACTORY.fullmatch(spec)) and not Path(spec).exists()


class ExportedModule(nn.Module):
    """An exported program's module as a plain ``nn.Module``: (N,C,H,W) -> what the program returns.

    The graph was fixed at export time (dropout and batch-norm modes included), so ``train()``/``eval()``
    only set the flag here; the exported module itself refuses ``eval()``. A program exported with a
    static batch size B is run on chunks of B rows, the last one padded with copies of its last row
    (rows are independent, and the padded outputs are dropped, so they add no gradient).
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()
        self.batch = _static_batch(program)

    def train(self, mode: bool = True) -> "ExportedModule":
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.batch is None or x.shape[0] == self.batch:
            return self.program(x)
        outs = []
        for chunk in x.split(self.batch):
            pad = self.batch - chunk.shape[0]
            if pad:
                chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            outs.append(self.program(chunk)[: self.batch - pad])
        return torch.cat(outs)


def load_exported(path: Path, *, weights: str | os.PathLike | None = None,
                  input_size: Sequence[int] | None = None) -> Classifier:
    """A ``torch.export`` program file (``.pt2``) -> Classifier; input_size defaults to the example input's."""
    try:
        program = torch.export.load(path)
    except Exception as err:  # torch raises zip, JSON and deserialisation errors of many kinds
        raise ValueError(f"model file {str(path)!r} is not a readable torch.export program (.pt2): {err}") from err
    inputs = _user_input_shapes(program)
    if len(inputs) != 1:
        raise ValueError(f"model file {str(path)!r}: the exported program takes {len(inputs)} inputs; heatlens "
                         "explains programs of one image batch (N,C,H,W)")
    net = ExportedModule(program)
    if weights is not None:
        load_weights(net.program, weights)
    if input_size is None:
        shape = inputs[0]
        if len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
            raise ValueError(f"model file {str(path)!r}: cannot read (C,H,W) from the exported input shape "
                             f"{tuple(shape)}; pass input_size=(C, H, W)")
        input_size = tuple(shape[1:])
    return wrap(net, input_size=input_size, name=path.stem)


def load_factory(spec: str, *, weights: str | os.PathLike | None = None,
                 input_size: Sequence[int] | None = None) -> Classifier:
    """``"package.module:function"`` -> Classifier: ``function()`` returns an ``nn.Module`` or a ``Classifier``.

    A module gets ``weights`` (if given), is put in eval mode and wrapped with ``input_size`` (or its own
    ``input_size`` attribute); return ``heatlens.wrap(net, input_size=..., preprocessing=..., labels=...)``
    from the function to set preprocessing and labels too.
    """
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({err}); is it on the Python "
                         "path (run from the folder that holds it, or set PYTHONPATH)?") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ValueError(f"model {spec!r}: module {module_name!r} has no function {func_name!r}."
                         f"{did_you_mean(func_name, names)}")
    built = func()
    clf = built if isinstance(built, Classifier) else None
    net = clf.net if clf is not None else built
    if not isinstance(net, nn.Module):
        raise TypeError(f"model {spec!r}: {func_name}() must return a torch.nn.Module or a heatlens Classifier, "
                        f"got {type(built).__name__}")
    if weights is not None:
        load_weights(net, weights)
    if clf is not None:
        return clf
    size = input_size if input_size is not None else getattr(net, "input_size", None)
    if size is None:
        raise ValueError(f"model {spec!r}: {func_name}() returned an nn.Module without input_size; pass "
                         "input_size=(C, H, W) (command line: --input-size 3,224,224), give the module an "
                         "input_size attribute, or return heatlens.wrap(net, input_size=...) from the function")
    return wrap(net.eval(), input_size=size, name=func_name)


def load_weights(net: nn.Module, weights: str | os.PathLike) -> None:
    """Load a state dict saved with ``torch.save(net.state_dict(), FILE)`` into ``net`` (strict)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled objects; torch raises several kinds
        raise ValueError(f"weights file {str(path)!r} is not a state dict torch.load(weights_only=True) can read: "
                         f"{_first_line(err)}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} must hold a state dict (parameter name -> tensor), "
                         f"as torch.save(net.state_dict(), path) writes; got {type(state).__name__}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights file {str(path)!r} does not fit the model: {_first_line(err)}") from err


def _user_input_shapes(program: torch.export.ExportedProgram) -> list[tuple]:
    names = set(program.graph_signature.user_inputs)
    return [tuple(n.meta["val"].shape) for n in program.graph.nodes
            if n.op == "placeholder" and n.name in names and "val" in n.meta]


def _static_batch(program: torch.export.ExportedProgram) -> int | None:
    shapes = _user_input_shapes(program)
    first = shapes[0][0] if shapes and shapes[0] else None
    return first if isinstance(first, int) else None


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:400]
