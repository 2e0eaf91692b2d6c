"""The models, picked by name from a plain dict (no registry), and a checked constructor.

Every model follows one contract: ``forward(batch) -> dict[str, Tensor]`` with ``"forces"``
[N, 3] (eV/Å) and, for models with an energy, ``"energy"`` [G] (eV); the class attribute
``energy_from_gradient`` says whether forces are -dE/dpos.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from forcenet.models.dimenetpp import DimeNetPlusPlus
from forcenet.models.forcenet import ForceNet
from forcenet.models.gns import GNS
from forcenet.models.schnet import SchNet

MODELS: dict[str, type[nn.Module]] = {
    "forcenet": ForceNet,
    "schnet": SchNet,
    "dimenetpp": DimeNetPlusPlus,
    "gns": GNS,
}


class ModelConfigError(ValueError):
    """Unknown model name or constructor argument."""


def hyperparameters(name: str) -> set[str]:
    """The keyword arguments (hyperparameters) that model ``name`` accepts."""
    cls = _model_class(name)
    params = inspect.signature(cls.__init__).parameters
    return {p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Construct ``MODELS[name](**kwargs)``, naming any unknown model or argument."""
    cls = _model_class(name)
    allowed = hyperparameters(name)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ModelConfigError(
            f"model {name!r} has no argument(s) {unknown}; accepted: {sorted(allowed)}"
        )
    return cls(**dict(kwargs))


def _model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


__all__ = [
    "GNS",
    "MODELS",
    "DimeNetPlusPlus",
    "ForceNet",
    "ModelConfigError",
    "SchNet",
    "build_model",
    "hyperparameters",
]
