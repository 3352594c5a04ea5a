"""The adapter registry: one adapter class per ``config.model_type``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

if TYPE_CHECKING:
    from lightning_tlq.adapters.base import VLMAdapter


class UnsupportedModelError(ValueError):
    """Raised when a model (family or structure) is not supported by any registered adapter."""


# ------------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Any] = {}
_AdapterT = TypeVar("_AdapterT", bound=type)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def register_adapter(cls: _AdapterT) -> _AdapterT:
    """Class decorator registering a :class:`VLMAdapter` subclass for its :attr:`~VLMAdapter.model_types`.

    Args:
        cls: The adapter class.

    Returns:
        ``cls`` unchanged.

    Raises:
        TypeError: If ``cls`` is not a ``VLMAdapter`` subclass.
        ValueError: If it declares no model types, or one is already taken by a different adapter.
    """
    # duck-typed: importing VLMAdapter here would make the registry and the base class import each other
    if not (isinstance(cls, type) and all(hasattr(cls, a) for a in ("model_types", "module_groups", "capture"))):
        raise TypeError(f"@register_adapter expects a VLMAdapter subclass, got {cls!r}.")
    if not cls.model_types:
        raise ValueError(f"{cls.__name__}.model_types is empty; list the config.model_type values it handles.")
    for model_type in cls.model_types:
        existing = _REGISTRY.get(model_type)
        same = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if existing is not None and not same:
            raise ValueError(f"Model type {model_type!r} is already handled by {existing.__qualname__}.")
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> tuple[str, ...]:
    """Return the sorted ``config.model_type`` values that have a registered adapter."""
    return tuple(sorted(_REGISTRY))


def get_adapter(model: nn.Module) -> VLMAdapter:
    """Return the registered adapter for ``model``, chosen by ``model.config.model_type``.

    Args:
        model: A Hugging Face vision-language model.

    Returns:
        An adapter instance wrapping ``model``.

    Raises:
        UnsupportedModelError: If no adapter handles the model type.
    """
    model_type = _model_type(model)
    cls = _REGISTRY.get(model_type) if model_type is not None else None
    if cls is None:
        raise UnsupportedModelError(
            f"No adapter for model type {model_type!r} ({type(model).__name__}). Supported model types: "
            f"{', '.join(supported_model_types()) or 'none'}. To add one, subclass VLMAdapter in "
            f"lightning_tlq/adapters/<family>.py with model_types = ({model_type!r},), decorate it with "
            "@register_adapter and import the module in lightning_tlq/adapters/__init__.py; docs/adapters.md "
            "explains each attribute and the layer-by-layer equivalence test a new adapter must pass."
        )
    return cls(model)
