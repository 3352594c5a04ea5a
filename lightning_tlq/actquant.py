"""Activation fake-quantization on the inputs of ``nn.Linear`` modules, and its record in saved checkpoints.

W4A8 (``quant.act_bits=8``) quantizes the input of every quantized Linear per token, dynamically and
symmetrically (:mod:`lightning_tlq.core.actquant`). The same forward pre-hook is used while calibrating (so the
Hessians and the propagated activations are those of the quantized inference path) and when evaluating a saved
model::

    model = AutoModelForImageTextToText.from_pretrained(out_dir)
    handle = apply_saved_activation_quant(model)  # reads config.json's "tlq_quantization"
    model.generate(...)
    handle.remove()

Checkpoints keep fake-quantized weights (on the integer grid, in the model dtype); what the inference path must
add is described by :func:`quantization_record`, stored under :data:`CONFIG_KEY` in ``config.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_tlq.config import QuantArgs
from lightning_tlq.core.actquant import check_act_bits, fake_quantize_per_token, token_activation_args

__all__ = [
    "CONFIG_KEY",
    "ActivationQuantHandle",
    "apply_activation_quant",
    "apply_saved_activation_quant",
    "quantization_record",
]

CONFIG_KEY = "tlq_quantization"
"""Key of the quantization record in the saved model config (``config.json``)."""
_FORMAT_VERSION = 1
_MARK = "_tlq_act_bits"  # set on a module while it has an activation-quantization hook


@dataclass
class ActivationQuantHandle:
    """The hooks installed by :func:`apply_activation_quant`; ``remove()`` them, or use it as a context manager."""

    bits: int | None = None
    modules: list[nn.Module] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        for module in self.modules:
            if hasattr(module, _MARK):
                delattr(module, _MARK)
        self._handles, self.modules = [], []

    def __enter__(self) -> ActivationQuantHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _pre_hook(bits: int, name: str) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (fake_quantize_per_token(args[0], bits), *args[1:]), kwargs
        if "input" in kwargs:
            return args, {**kwargs, "input": fake_quantize_per_token(kwargs["input"], bits)}
        raise RuntimeError(f"Activation quantization of {name}: the module was called without an input tensor.")

    return hook


def _resolve(model: nn.Module | None, modules: Iterable[str | nn.Module]) -> list[tuple[str, nn.Module]]:
    resolved: dict[int, tuple[str, nn.Module]] = {}
    for item in modules:
        if isinstance(item, str):
            if model is None:
                raise ValueError(f"Module {item!r} is given by name, so apply_activation_quant needs the model.")
            try:
                name, module = item, model.get_submodule(item)
            except AttributeError as err:
                raise ValueError(f"{type(model).__name__} has no module {item!r} to quantize activations of.") from err
        else:
            name, module = type(item).__name__, item
        if not isinstance(module, nn.Linear):
            kind = type(module).__name__
            raise TypeError(f"Activation quantization applies to nn.Linear inputs; {name} is a {kind}.")
        resolved.setdefault(id(module), (name, module))
    return list(resolved.values())


def has_activation_quant(model: nn.Module) -> bool:
    """Whether any module of ``model`` has an activation-quantization hook (:func:`apply_activation_quant`)."""
    return any(hasattr(module, _MARK) for module in model.modules())


def apply_activation_quant(
    model: nn.Module | None, act_bits: int | None, modules: Iterable[str | nn.Module]
) -> ActivationQuantHandle:
    """Fake-quantize the input of each given Linear per token (dynamic, symmetric) with a forward pre-hook.

    Args:
        model: The model that qualified names in ``modules`` refer to (may be None if only modules are given).
        act_bits: Activation bits (8 for W4A8); None installs nothing and returns an empty handle.
        modules: Qualified module names or ``nn.Linear`` modules; duplicates are hooked once.

    Returns:
        A handle whose ``remove()`` takes the hooks off again (also usable as a context manager).

    Raises:
        ValueError: If ``act_bits`` is invalid or a name does not exist.
        TypeError: If a module is not an ``nn.Linear``.
        RuntimeError: If a module already has activation quantization (quantizing twice changes the result).
    """
    if act_bits is None:
        return ActivationQuantHandle()
    check_act_bits(act_bits)
    targets = _resolve(model, modules)
    doubled = [name for name, module in targets if hasattr(module, _MARK)]
    if doubled:
        raise RuntimeError(
            f"{len(doubled)} module(s) already have activation quantization, e.g. {doubled[:3]}; remove the "
            "existing handle first."
        )
    handle = ActivationQuantHandle(bits=act_bits)
    for name, module in targets:
        handle._handles.append(module.register_forward_pre_hook(_pre_hook(act_bits, name), with_kwargs=True))
        setattr(module, _MARK, act_bits)
        handle.modules.append(module)
    return handle


def quantization_record(quant: QuantArgs, targets: Sequence[str]) -> dict[str, Any]:
    """The record saved under :data:`CONFIG_KEY`: what the checkpoint's weights are and what inference must add.

    ``weights`` and ``input_activations`` are compressed-tensors ``QuantizationArgs`` fields, encoded in one place
    for this record and the export (:meth:`QuantSpec.compressed_tensors_args`,
    :func:`~lightning_tlq.core.actquant.token_activation_args`); ``input_activations`` adds the ``scale`` rule.

    Args:
        quant: The settings the model was calibrated with.
        targets: Qualified names of every quantized Linear.
    """
    activations = None
    if quant.act_bits is not None:
        activations = {
            **token_activation_args(quant.act_bits),
            "scale": f"absmax / {(2**quant.act_bits - 1) / 2}",
        }
    return {
        "version": _FORMAT_VERSION,
        "producer": "lightning_tlq",
        "format": "fake_quant",  # weights stored dequantized, on the integer grid, in the model dtype
        "method": quant.method,
        "weights": quant.spec.compressed_tensors_args(),
        "input_activations": activations,
        "vision": quant.vision,
        "targets": list(targets),
    }


def saved_quantization_config(model: nn.Module) -> dict[str, Any]:
    """Return the :data:`CONFIG_KEY` record of a model loaded from a lightning-tlq checkpoint.

    Raises:
        ValueError: If the model's config has no such record.
    """
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(record, Mapping):
        raise ValueError(
            f"{type(model).__name__}'s config has no {CONFIG_KEY!r} record: it was not saved by lightning-tlq "
            "calibrate (or the key was removed from config.json)."
        )
    if record.get("version") != _FORMAT_VERSION:
        raise ValueError(f"Unsupported {CONFIG_KEY} version {record.get('version')!r}; expected {_FORMAT_VERSION}.")
    return dict(record)


def apply_saved_activation_quant(model: nn.Module) -> ActivationQuantHandle:
    """Re-apply the activation quantization recorded in a saved model's config (no-op for weight-only models).

    Raises:
        ValueError: If the record is missing, or names modules the model lacks.
    """
    record = saved_quantization_config(model)
    activations = record.get("input_activations")
    if activations is None:
        return ActivationQuantHandle()
    if activations.get("strategy") != "token" or not activations.get("dynamic") or not activations.get("symmetric"):
        raise ValueError(f"Only dynamic symmetric per-token activation quantization is supported, got {activations}.")
    return apply_activation_quant(model, int(activations["num_bits"]), record["targets"])
