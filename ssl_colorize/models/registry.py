"""The encoder registry: a plain dict ``name -> factory`` (DESIGN.md: "created by name from one registry").

A factory is a function returning an :class:`~ssl_colorize.models.base.Encoder`; it is registered with
``@register_model`` under its function name. :func:`create_model` calls it and stamps the model with
``model.model_spec = {"name": ..., "kwargs": {...}}``, every argument resolved (defaults included), so
``create_model(**model.model_spec)`` rebuilds the same architecture even if a default changes later.

Arguments that only matter while building (e.g. a path to weights to load once) are declared
``init_only``: they are used, but left out of ``model_spec``, because a checkpoint carries the weights
itself and the file may not exist where the checkpoint is reloaded.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

#: name -> factory. Filled by the @register_model decorators when ssl_colorize.models is imported.
MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
#: name -> argument names left out of model_spec.
_INIT_ONLY: dict[str, frozenset[str]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, init_only: Iterable[str] = (), card=None):
    """Decorator: register ``fn`` under ``fn.__name__``. Use bare or as ``@register_model(card=..., init_only=(...))``.

    ``card``: the encoder's :class:`~ssl_colorize.models.cards.EncoderCard` (its name must be the factory's).
    """

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__name__
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        params = inspect.signature(factory).parameters
        if "kwargs" in params:
            raise ValueError(f"factory {name!r} may not take an argument called 'kwargs' (see create_model)")
        missing = [arg for arg in init_only if arg not in params]
        if missing:
            raise ValueError(f"init_only arguments {missing} are not parameters of {name!r}")
        if card is not None:
            from ssl_colorize.models.cards import add_card

            if card.name != name:
                raise ValueError(f"card {card.name!r} given to factory {name!r}")
            add_card(card)
        MODEL_REGISTRY[name] = factory
        _INIT_ONLY[name] = frozenset(init_only)
        return factory

    if fn is not None:
        return decorate(fn)
    return decorate


def _load_builtin_models() -> None:
    """Importing the package registers the built-in models (its __init__ imports every model file)."""
    importlib.import_module("ssl_colorize.models")


def list_models() -> list[str]:
    """The registered model names, sorted."""
    _load_builtin_models()
    return sorted(MODEL_REGISTRY)


def create_model(name: str, kwargs: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``.

    Arguments come from ``kwargs`` (a dict, so that ``create_model(**model.model_spec)`` works)
    updated by keyword ``overrides``: ``create_model("alexnet_lab", geometry="transfer")`` and
    ``create_model(**spec, geometry="transfer")`` are both fine. An unknown name or argument raises
    ValueError listing what is known.
    """
    _load_builtin_models()
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODEL_REGISTRY)}")
    factory = MODEL_REGISTRY[name]
    arguments = {**(kwargs or {}), **overrides}
    signature = inspect.signature(factory)
    try:
        bound = signature.bind(**arguments)
    except TypeError as exc:
        raise ValueError(
            f"bad arguments {sorted(arguments)} for model {name!r}: {exc}; it takes {list(signature.parameters)}"
        ) from exc
    bound.apply_defaults()
    model = factory(*bound.args, **bound.kwargs)
    spec_kwargs = {k: v for k, v in bound.arguments.items() if k not in _INIT_ONLY[name]}
    model.model_spec = {"name": name, "kwargs": spec_kwargs}
    return model
