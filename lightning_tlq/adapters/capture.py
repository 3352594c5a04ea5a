"""Capturing what each decoder layer receives in one forward, and moving nested inputs between devices."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_tlq.adapters.registry import UnsupportedModelError

if TYPE_CHECKING:
    from lightning_tlq.adapters.base import VLMAdapter

__all__ = ["CapturedInputs", "move_to"]

# Layer kwargs that must never be replayed: caches grow on replay, the rest are output/control flags.
DROPPED_LAYER_KWARGS = frozenset(
    {
        "cache",
        "past_key_values",
        "past_key_value",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "logits_to_keep",
    }
)


class _StopForward(Exception):
    """Raised from the last decoder layer's pre-hook to end a capture forward early."""


def move_to(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a nested structure of tuples, lists and dicts to ``device``.

    Objects that appear several times (for example the RoPE tuple shared by all layers) are moved once and
    stay shared in the result.

    Args:
        obj: A tensor, or a (possibly nested) tuple, named tuple, list or mapping holding tensors. Other
            leaves are returned unchanged.
        device: Target device.
        dtype: Optional dtype for floating-point tensors; integer and bool tensors keep theirs.

    Returns:
        A structure of the same shape with moved tensors.
    """
    return _move(obj, device, dtype, {})


def _move(obj: Any, device: torch.device | str, dtype: torch.dtype | None, memo: dict[int, Any]) -> Any:
    """Implement :func:`move_to`; ``memo`` maps ``id`` of already moved objects to their copies."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, Tensor):
        cast = dtype if dtype is not None and obj.is_floating_point() else None
        out: Any = obj.to(device=device, dtype=cast)
    elif isinstance(obj, Mapping):
        out = {k: _move(v, device, dtype, memo) for k, v in obj.items()}
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        out = type(obj)(*(_move(v, device, dtype, memo) for v in obj))
    elif isinstance(obj, (tuple, list)):
        out = type(obj)(_move(v, device, dtype, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


def _contains_tensor(obj: Any) -> bool:
    """Return whether a nested structure of tuples, lists and dicts holds at least one tensor."""
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_contains_tensor(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return any(_contains_tensor(v) for v in obj)
    return False


@dataclass
class CapturedInputs:
    """Inputs of the text decoder layers, recorded during one forward pass of the full model.

    Attributes:
        hidden: ``(B, S, D)`` input hidden states of decoder layer 0 (text and image embeddings merged).
        layer_kwargs: Keyword arguments each decoder layer ``i`` received (``position_embeddings``,
            ``attention_mask``, ``position_ids``, ...). Caches, ``use_cache`` and other leftovers that hold no
            tensor are dropped. Entries may share objects (the same RoPE tuple or mask for every layer).
        residual_delta: Per decoder layer ``i``, what the model adds to layer ``i``'s output before layer ``i + 1``
            (or the final norm) receives it, e.g. Qwen3-VL's deepstack visual features; ``None`` where nothing
            is added. ``None`` as a whole means nothing is added anywhere. Whoever runs layers one by one must
            pass every output through :meth:`add_residual_delta`.
    """

    hidden: Tensor
    layer_kwargs: list[dict[str, Any]]
    residual_delta: list[Tensor | None] | None = None

    def add_residual_delta(self, layer_index: int, output: Tensor) -> Tensor:
        """Return decoder layer ``layer_index``'s output as the next layer (or the head) receives it.

        Args:
            layer_index: Index of the decoder layer that produced ``output``.
            output: ``(B, S, D)`` output of that layer (full-precision or quantized).

        Returns:
            ``output`` plus the recorded delta of that layer, or ``output`` itself when there is none.
        """
        if self.residual_delta is None:
            return output
        delta = self.residual_delta[layer_index]
        return output if delta is None else output + delta.to(output.dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CapturedInputs:
        """Return a copy on ``device``, with floating tensors cast to ``dtype``; shared objects stay shared.

        Args:
            device: Target device.
            dtype: Optional dtype for floating-point tensors (masks and position ids keep theirs).

        Returns:
            The moved inputs.
        """
        memo: dict[int, Any] = {}
        return CapturedInputs(
            hidden=_move(self.hidden, device, dtype, memo),
            layer_kwargs=[_move(kw, device, dtype, memo) for kw in self.layer_kwargs],
            residual_delta=_move(self.residual_delta, device, dtype, memo),
        )


class _Recorder:
    """Capture hooks: each decoder layer's inputs, and what the model adds to the hidden states between layers.

    Between two decoder layers a Llama-like model passes the very tensor the first one returned. Anything else
    (Qwen3-VL adds deepstack visual features after the first layers) is recorded as ``received - output``.
    """

    def __init__(self, adapter: VLMAdapter, count: int, to_end: bool) -> None:
        self.adapter, self.count, self.to_end = adapter, count, to_end
        self.first: Tensor | None = None
        self.kwargs: list[dict[str, Any] | None] = [None] * count
        self.deltas: list[Tensor | None] = [None] * count
        self._output: tuple[int, Tensor] | None = None

    def before_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden, layer_kwargs = _split_layer_call(module, args, kwargs)
        if index == 0:
            self.first = hidden
        else:
            self._received(index - 1, hidden)
        self.kwargs[index] = self.adapter._clean_layer_kwargs(layer_kwargs)
        if index == self.count - 1 and not self.to_end:
            raise _StopForward

    def after_layer(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._output = (index, _first_tensor(output, index))

    def before_norm(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._received(self.count - 1, args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    def _received(self, index: int, received: Tensor) -> None:
        """Record what reached the module after decoder layer ``index``, compared with that layer's output."""
        if self._output is None or self._output[0] != index:
            raise UnsupportedModelError(
                f"Decoder layer {index} of {type(self.adapter.model).__name__} did not run right before the next "
                f"module; override capture() in {type(self.adapter).__name__}."
            )
        output, self._output = self._output[1], None
        if received is output:
            return
        if received.shape != output.shape:
            raise UnsupportedModelError(
                f"The hidden states change shape after decoder layer {index} ({tuple(output.shape)} -> "
                f"{tuple(received.shape)}); override capture() in {type(self.adapter).__name__}."
            )
        delta = received - output
        if bool(delta.any()):
            self.deltas[index] = delta


def _split_layer_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Split the arguments of a decoder-layer call into the hidden-states input and keyword arguments.

    Extra positional arguments (beyond the hidden states) are named using the layer's ``forward`` signature,
    so replaying ``layer(hidden, **kwargs)`` is equivalent whatever calling convention the model used.
    """
    kwargs = dict(kwargs)
    if not args:
        if "hidden_states" not in kwargs:
            raise UnsupportedModelError(
                f"{type(module).__name__} was called without positional arguments and without `hidden_states`; "
                "override VLMAdapter.capture for this family."
            )
        return kwargs.pop("hidden_states"), kwargs
    if len(args) > 1:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        kwargs.update(zip(params[1 : len(args)], args[1:]))
    return args[0], kwargs


def _passthrough(*args: Any, **kwargs: Any) -> Tensor:
    """Stand-in for a decoder layer's forward that returns its hidden-states input unchanged."""
    return args[0] if args else kwargs["hidden_states"]


def _first_tensor(output: Any, layer_index: int) -> Tensor:
    """Return the hidden states from a decoder layer output (a tensor, or a tuple/list starting with one)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"Decoder layer {layer_index} returned {type(output).__name__}; expected a tensor or a tuple whose "
            "first item is the hidden states. Override VLMAdapter.run_layer for this family."
        )
    return output


def capture_decoder_inputs(adapter: VLMAdapter, batch: Mapping[str, Any], skip_layers: bool) -> CapturedInputs:
    """:meth:`VLMAdapter.capture <lightning_tlq.adapters.base.VLMAdapter.capture>` (see there)."""
    inputs = adapter.forward_inputs(batch)
    layers = adapter.decoder_layers()
    recorder = _Recorder(adapter, len(layers), to_end=adapter.injects_residuals)
    handles = []
    saved_forwards = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(partial(recorder.before_layer, i), with_kwargs=True))
            handles.append(layer.register_forward_hook(partial(recorder.after_layer, i)))
            if skip_layers:
                layer.forward = _passthrough
        if adapter.injects_residuals:
            norm = adapter._final_norm()
            handles.append(norm.register_forward_pre_hook(recorder.before_norm, with_kwargs=True))
        with torch.no_grad():
            adapter.model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for layer, saved in zip(layers, saved_forwards):
            if saved is not None:
                layer.forward = saved
            else:
                layer.__dict__.pop("forward", None)
    missing = [i for i, kw in enumerate(recorder.kwargs) if kw is None]
    if missing or recorder.first is None:
        raise RuntimeError(
            f"Decoder layers {missing} of {type(adapter.model).__name__} were not called during the capture "
            f"forward; override capture() in {type(adapter).__name__}."
        )
    changed = [i for i, delta in enumerate(recorder.deltas) if delta is not None]
    if changed and not adapter.injects_residuals:
        raise UnsupportedModelError(
            f"{type(adapter.model).__name__} changes the hidden states between decoder layers {changed} and the "
            f"next ones, so layer-by-layer replay would be wrong; set injects_residuals = True in "
            f"{type(adapter).__name__} if the change is an addition that does not depend on the hidden states."
        )
    kwargs = [kw for kw in recorder.kwargs if kw is not None]
    return CapturedInputs(recorder.first, kwargs, recorder.deltas if adapter.injects_residuals else None)
