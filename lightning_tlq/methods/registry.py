"""The method registry: one handler instance per ``quant.method`` name."""

from __future__ import annotations

from lightning_tlq.methods.base import Method

_REGISTRY: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the handler of ``quant.method=<cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`.")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"A method named {cls.name!r} is registered already ({type(_REGISTRY[cls.name]).__name__}).")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The handler of method ``name``; ``ValueError`` naming ``--quant.method`` and the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"quant.method={name!r} is not supported; choose one of {', '.join(method_names())}."
        ) from None


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)
