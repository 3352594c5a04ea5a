"""Model-family adapters: everything the quantizer needs to know about a vision-language model.

The calibration loop is family-agnostic. It asks an adapter for the text decoder layers, the linear modules
to quantize (grouped in inference order), the inputs each decoder layer receives, and how to run a single
layer. Each family is one small module that subclasses :class:`VLMAdapter`, overrides what differs, and is
decorated with :func:`register_adapter`; :func:`get_adapter` then picks it by ``model.config.model_type``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "CapturedInputs",
    "ScaleFold",
    "UnsupportedModelError",
    "VLMAdapter",
    "get_adapter",
    "move_to",
    "register_adapter",
    "supported_model_types",
]

# Layer kwargs that must never be replayed: caches grow on replay, the rest are output/control flags.
_DROPPED_LAYER_KWARGS = frozenset(
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

# Llama-style decoder layer: q/k/v read the normed input, o reads attention, gate/up read the normed residual.
_LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


# Per module group of a Llama-style layer: the op producing the group's input (awq / smoothquant / mbq fold 1/s
# into it), and the module whose output gradient weighs the group's tokens under mbq (attention / MLP block).
_LLAMA_SMOOTHING_PRODUCERS: tuple[str | None, ...] = (
    "input_layernorm",
    "self_attn.v_proj",
    "post_attention_layernorm",
    "mlp.up_proj",
)
_LLAMA_BLOCK_OUTPUTS: tuple[str, ...] = ("self_attn.o_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.down_proj")


class UnsupportedModelError(ValueError):
    """Raised when a model (family or structure) is not supported by any registered adapter."""


@dataclass(frozen=True)
class ScaleFold:
    """How one module group's per-input-channel scales are folded (awq / smoothquant / mbq).

    Attributes:
        modules: The group's linear modules (names relative to the decoder layer), all reading one input.
        producer: The op whose output is that input, into which ``1 / s`` is folded; None when no exact fold
            exists (the group is then not smoothed, see :attr:`skipped`).
        kind: ``norm`` (an elementwise-affine norm: ``(offset + weight) * n(x) + bias``) or ``linear`` (divide the
            producer's output rows), None when skipped.
        offset: The norm's weight offset: 0 for ``weight * n(x)``, 1 for Gemma's ``(1 + weight) * n(x)``.
        block_output: The module whose output gradient weighs this group's vision tokens under mbq (o_proj for
            the attention groups, down_proj for the MLP groups).
        skipped: Why the group is not smoothed (None when it is).
    """

    modules: tuple[str, ...]
    producer: str | None
    kind: str | None
    offset: float
    block_output: str
    skipped: str | None = None


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


def require_linear(adapter: object, parent: nn.Module, name: str, where: str, fix: str) -> nn.Linear:
    """``parent.get_submodule(name)``, which must be an ``nn.Linear``; otherwise a clear error naming ``fix``."""
    try:
        module = parent.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        found = "nothing" if module is None else type(module).__name__
        raise UnsupportedModelError(
            f"{type(adapter).__name__} expects an nn.Linear at '{name}' in {where} ({type(parent).__name__}) but "
            f"found {found}; {fix} for this family."
        )
    return module


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


class VLMAdapter:
    """Family knowledge of a Hugging Face vision-language model, with Llama-like defaults.

    Subclasses set :attr:`model_types` and override only what differs for their family (extra forward
    inputs, module groups, vision prefixes, ...), then register with :func:`register_adapter`.

    Attributes:
        model_types: ``config.model_type`` values handled by the adapter.
        forward_keys: Batch keys passed to the model forward (others, such as labels, are dropped).
        linear_groups: Linear module names relative to a decoder layer, grouped in inference order.
        vision_prefixes: Qualified names (relative to the model) of the vision tower and projector.
        kept_layer_kwargs: Layer kwargs kept by :meth:`capture` even though they hold no tensor.
        injects_residuals: Whether the model adds something to the hidden states between decoder layers (Qwen3-VL
            deepstack). Capture then records it per layer (:attr:`CapturedInputs.residual_delta`) and also runs
            the last layer; otherwise finding such an addition is an error.
        smoothing_producers: Per entry of :attr:`linear_groups`, the op whose output is exactly that group's input
            and nothing else's, so that awq / smoothquant / mbq can fold ``1 / s`` into it: a norm, or a linear
            whose output channels reach the group channel-wise-linearly (v_proj through attention, up_proj
            through ``act(gate) * up``). None for a group without one; None as a whole refuses those methods.
        block_outputs: Per group, the module whose output gradient gives mbq's vision weight (attention: o_proj,
            MLP: down_proj).
        norm_weight_offset: 0 if the norms compute ``weight * n(x)`` (Llama, Qwen), 1 for ``(1 + weight) * n(x)``
            (Gemma). :meth:`smoothing_plan` checks it numerically on each norm.
        clip_excluded: Modules that AWQ's clip search leaves alone (q and k: their outputs meet in ``q k^T``).
        model: The wrapped model.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    forward_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values")
    linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = _LLAMA_GROUPS
    vision_prefixes: ClassVar[tuple[str, ...]] = ()
    kept_layer_kwargs: ClassVar[frozenset[str]] = frozenset()
    injects_residuals: ClassVar[bool] = False
    smoothing_producers: ClassVar[tuple[str | None, ...] | None] = _LLAMA_SMOOTHING_PRODUCERS
    block_outputs: ClassVar[tuple[str, ...]] = _LLAMA_BLOCK_OUTPUTS
    norm_weight_offset: ClassVar[float] = 0.0
    clip_excluded: ClassVar[tuple[str, ...]] = ("self_attn.q_proj", "self_attn.k_proj")

    def __init__(self, model: nn.Module) -> None:
        """Wrap ``model``.

        Args:
            model: A Hugging Face image-text-to-text model (``...ForConditionalGeneration``).

        Raises:
            UnsupportedModelError: If the model's ``config.model_type`` is not in :attr:`model_types`.
        """
        model_type = _model_type(model)
        if self.model_types and model_type not in self.model_types:
            raise UnsupportedModelError(
                f"{type(self).__name__} handles model types {list(self.model_types)}, got {model_type!r}; "
                "use get_adapter(model) to pick the right adapter."
            )
        self.model = model

    # ----------------------------------------------------------------------------------------------- config
    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""
        config = self.model.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise UnsupportedModelError(
            f"{type(config).__name__} has neither `image_token_id` nor `image_token_index`; "
            f"override image_token_id in {type(self).__name__}."
        )

    @property
    def pad_token_id(self) -> int | None:
        """Padding token id from the text config (or the top-level config), ``None`` if unset."""
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for cfg in (text_config, config):
            value = getattr(cfg, "pad_token_id", None)
            if value is not None:
                return int(value)
        return None

    @property
    def num_layers(self) -> int:
        """Number of text decoder layers."""
        return len(self.decoder_layers())

    # ------------------------------------------------------------------------------------------- structure
    def text_model(self) -> nn.Module:
        """Return the text decoder stack (the module owning ``layers`` and the final ``norm``).

        Raises:
            UnsupportedModelError: If no candidate module has an ``nn.ModuleList`` named ``layers``.
        """
        candidates: list[Any] = []
        if hasattr(self.model, "get_decoder"):
            decoder = self.model.get_decoder()
            candidates += [decoder, getattr(decoder, "language_model", None)]
        candidates.append(getattr(getattr(self.model, "model", None), "language_model", None))
        for module in candidates:
            if isinstance(getattr(module, "layers", None), nn.ModuleList):
                return module
        raise UnsupportedModelError(
            f"Cannot find the text decoder layers of {type(self.model).__name__} (tried model.get_decoder().layers "
            f"and model.model.language_model.layers); override text_model() in {type(self).__name__}."
        )

    def decoder_layers(self) -> nn.ModuleList:
        """Return the text decoder layers, in execution order."""
        return self.text_model().layers

    def layer_name(self, layer_index: int) -> str:
        """Return the qualified name of decoder layer ``layer_index`` within the model."""
        return self._qualified_name(self._layer(layer_index))

    def module_groups(self, layer_index: int) -> list[list[str]]:
        """Return the linear modules of a decoder layer to quantize, grouped in inference order.

        Modules in one group read the same input and are calibrated together; groups are solved one after
        the other (true-sequential calibration).

        Args:
            layer_index: Index of the decoder layer.

        Returns:
            Module names relative to the decoder layer, e.g. ``[["self_attn.q_proj", ...], ["self_attn.o_proj"]]``.

        Raises:
            UnsupportedModelError: If a listed module is missing or is not an ``nn.Linear``.
        """
        layer = self._layer(layer_index)
        groups = [list(group) for group in self.linear_groups]
        for name in (n for group in groups for n in group):
            self._check_linear(layer, layer_index, name)
        return groups

    def target_module_names(self) -> list[str]:
        """Return the qualified names of all linear modules to quantize, over all decoder layers."""
        return [
            f"{self.layer_name(i)}.{name}"
            for i in range(self.num_layers)
            for group in self.module_groups(i)
            for name in group
        ]

    def smoothing_plan(self, layer_index: int) -> list[ScaleFold]:
        """Return, per module group of a decoder layer, where awq / smoothquant / mbq fold its input scales.

        A linear producer whose output width differs from the group's input width (``v_proj`` -> ``o_proj`` under
        grouped-query attention) has no exact per-channel fold: that group is skipped, as AWQ does. Each norm is
        checked numerically (on a float32 CPU copy with random weights, so this also works on the ``meta``
        device): dividing its weight as :attr:`norm_weight_offset` says must divide its output.

        Raises:
            UnsupportedModelError: If the family declares no producers, a producer is missing, or a norm does not
                behave like ``(offset + weight) * n(x)``.
        """
        groups = self.module_groups(layer_index)
        name = type(self).__name__
        if self.smoothing_producers is None or len(self.smoothing_producers) != len(groups):
            raise UnsupportedModelError(
                f"{name} declares no smoothing_producers for its {len(groups)} module groups, so awq, smoothquant and "
                "mbq cannot fold input scales in this family; use rtn, gptq or tlq, or set smoothing_producers (and "
                "block_outputs, norm_weight_offset) in the adapter."
            )
        layer = self._layer(layer_index)
        plan = []
        for group, producer, block in zip(groups, self.smoothing_producers, self.block_outputs):
            modules = [layer.get_submodule(n) for n in group]
            width = modules[0].in_features
            if any(m.in_features != width for m in modules):
                raise UnsupportedModelError(f"{name}: the modules {group} do not share one input width.")
            if producer is None:
                plan.append(ScaleFold(tuple(group), None, None, 0.0, block, "the family declares no producer op"))
                continue
            try:
                op = layer.get_submodule(producer)
            except AttributeError:
                raise UnsupportedModelError(
                    f"{name}.smoothing_producers names '{producer}', which decoder layer {layer_index} "
                    f"({type(layer).__name__}) does not have; fix smoothing_producers for this family."
                ) from None
            if isinstance(op, nn.Linear):
                skipped = None
                if op.out_features != width:
                    skipped = (
                        f"{producer} has {op.out_features} outputs but {group[0]} {width} inputs (grouped-query "
                        "attention): no exact per-channel fold"
                    )
                plan.append(ScaleFold(tuple(group), producer, "linear", 0.0, block, skipped))
                continue
            self._check_norm_fold(op, width, f"decoder layer {layer_index} {producer}")
            plan.append(ScaleFold(tuple(group), producer, "norm", self.norm_weight_offset, block))
        return plan

    def _check_norm_fold(self, norm: nn.Module, width: int, where: str) -> None:
        from lightning_tlq.core.smoothing import fold_into_norm_

        weight = getattr(norm, "weight", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (width,):
            raise UnsupportedModelError(
                f"{where} ({type(norm).__name__}) has no per-channel weight of width {width} to fold scales into; "
                f"awq, smoothquant and mbq do not support {type(self).__name__} as it is."
            )
        probe = copy.deepcopy(norm)
        probe = probe.to_empty(device="cpu") if weight.is_meta else probe.to("cpu")
        probe = probe.float()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in probe.parameters():
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            x = torch.randn(3, width, generator=gen)
            s = torch.rand(width, generator=gen) + 0.5
            expected = probe(x) / s
            fold_into_norm_(probe.weight, getattr(probe, "bias", None), s, self.norm_weight_offset)
            ok = torch.allclose(probe(x), expected, rtol=1e-4, atol=1e-6)
        if not ok:
            form = "(1 + weight) * n(x)" if self.norm_weight_offset else "weight * n(x)"
            raise UnsupportedModelError(
                f"{where} ({type(norm).__name__}) does not compute {form}: dividing its weight by s does not divide "
                f"its output by s, so awq, smoothquant and mbq cannot fold scales into it. Set norm_weight_offset "
                f"in {type(self).__name__} to the norm's form (1 for Gemma-style (1 + weight) norms), or use rtn, "
                "gptq or tlq."
            )

    @property
    def ignore_prefixes(self) -> tuple[str, ...]:
        """Qualified-name prefixes of modules kept in full precision: vision tower, projector and LM head."""
        for prefix in self.vision_prefixes:
            self._check_submodule(prefix)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_names = (self._qualified_name(head),) if isinstance(head, nn.Module) else ()
        return (*self.vision_prefixes, *head_names)

    def is_ignored(self, name: str) -> bool:
        """Return whether the qualified module name ``name`` lies under one of :attr:`ignore_prefixes`."""
        return any(name == p or name.startswith(p + ".") for p in self.ignore_prefixes)

    # ------------------------------------------------------------------------------------------- execution
    def forward_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Build model-forward kwargs from a collated batch.

        Keeps the keys in :attr:`forward_keys` (labels and other extras are dropped) and sets
        ``use_cache=False``. Families extend this to add inputs their forward requires.

        Args:
            batch: Collated batch with at least ``input_ids``.

        Returns:
            Keyword arguments for ``model(**kwargs)``.

        Raises:
            KeyError: If ``input_ids`` is missing.
        """
        if batch.get("input_ids") is None:
            raise KeyError(f"The batch needs `input_ids` to run the model; got keys {sorted(batch)}.")
        inputs = {key: batch[key] for key in self.forward_keys if batch.get(key) is not None}
        inputs["use_cache"] = False
        return inputs

    def capture(self, batch: Mapping[str, Any], skip_layers: bool = False) -> CapturedInputs:
        """Run the model once (no grad) and record the inputs of every text decoder layer.

        The forward stops right before the last decoder layer would run, so the work after it (final norm,
        LM head) is skipped; with :attr:`injects_residuals` it stops at the final norm instead, to record what is
        added after the last layer. All hooks are removed again, also when the forward raises.

        Args:
            batch: Collated batch, already on the model's device.
            skip_layers: replace every decoder layer's computation by the identity while capturing, so the
                decoder layers may stay on the CPU (only embeddings, vision tower and rotary embeddings run).
                Layer kwargs (masks, rotary embeddings) do not depend on the hidden states, so they are exact;
                so are residual deltas, which are additions that do not depend on them either.

        Returns:
            Layer-0 hidden states, the kwargs of each decoder layer and the per-layer residual deltas.

        Raises:
            RuntimeError: If some decoder layer was not reached during the forward.
            UnsupportedModelError: If the hidden states change between two decoder layers although
                :attr:`injects_residuals` is off.
        """
        inputs = self.forward_inputs(batch)
        layers = self.decoder_layers()
        recorder = _Recorder(self, len(layers), to_end=self.injects_residuals)
        handles = []
        saved_forwards = [layer.__dict__.get("forward") for layer in layers]
        try:
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(partial(recorder.before_layer, i), with_kwargs=True))
                handles.append(layer.register_forward_hook(partial(recorder.after_layer, i)))
                if skip_layers:
                    layer.forward = _passthrough
            if self.injects_residuals:
                norm = self._final_norm()
                handles.append(norm.register_forward_pre_hook(recorder.before_norm, with_kwargs=True))
            with torch.no_grad():
                self.model(**inputs)
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
                f"Decoder layers {missing} of {type(self.model).__name__} were not called during the capture "
                f"forward; override capture() in {type(self).__name__}."
            )
        changed = [i for i, delta in enumerate(recorder.deltas) if delta is not None]
        if changed and not self.injects_residuals:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} changes the hidden states between decoder layers {changed} and the "
                f"next ones, so layer-by-layer replay would be wrong; set injects_residuals = True in "
                f"{type(self).__name__} if the change is an addition that does not depend on the hidden states."
            )
        kwargs = [kw for kw in recorder.kwargs if kw is not None]
        return CapturedInputs(recorder.first, kwargs, recorder.deltas if self.injects_residuals else None)

    def run_layer(self, layer_index: int, hidden: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        """Run one decoder layer on ``hidden`` with its captured kwargs.

        Gradient mode is left to the caller.

        Args:
            layer_index: Index of the decoder layer.
            hidden: ``(B, S, D)`` input hidden states.
            kwargs: The layer's kwargs, e.g. ``CapturedInputs.layer_kwargs[layer_index]``.

        Returns:
            ``(B, S, D)`` output hidden states.
        """
        return _first_tensor(self._layer(layer_index)(hidden, **kwargs), layer_index)

    def head(self, hidden: Tensor) -> Tensor:
        """Apply the final norm and the LM head to the last decoder layer's output.

        Args:
            hidden: ``(B, S, D)`` output of the last decoder layer, passed through
                :meth:`CapturedInputs.add_residual_delta`.

        Returns:
            ``(B, S, V)`` logits, as the model's forward computes them.
        """
        norm, lm_head = self.head_modules()
        return lm_head(norm(hidden))

    def head_modules(self) -> list[nn.Module]:
        """The modules :meth:`head` runs (final norm, LM head); override together with :meth:`head`."""
        lm_head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(lm_head, nn.Module):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no output embeddings; override head() in {type(self).__name__}."
            )
        return [self._final_norm(), lm_head]

    # --------------------------------------------------------------------------------------------- helpers
    def _layer(self, layer_index: int) -> nn.Module:
        layers = self.decoder_layers()
        if not 0 <= layer_index < len(layers):
            raise IndexError(f"Decoder layer index {layer_index} is out of range; the model has {len(layers)} layers.")
        return layers[layer_index]

    def _final_norm(self) -> nn.Module:
        norm = getattr(self.text_model(), "norm", None)
        if not isinstance(norm, nn.Module):
            raise UnsupportedModelError(
                f"The text model of {type(self.model).__name__} has no final `norm`; override head() and capture() "
                f"in {type(self).__name__}."
            )
        return norm

    def _clean_layer_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Drop caches, control flags and values holding no tensor (unless in :attr:`kept_layer_kwargs`)."""
        return {
            key: value
            for key, value in kwargs.items()
            if key in self.kept_layer_kwargs or (key not in _DROPPED_LAYER_KWARGS and _contains_tensor(value))
        }

    def _check_linear(self, layer: nn.Module, layer_index: int, name: str) -> None:
        module = require_linear(
            self, layer, name, f"decoder layer {layer_index}", "override linear_groups or module_groups()"
        )
        embeddings = [getattr(self.model, f"get_{kind}_embeddings", lambda: None)() for kind in ("input", "output")]
        if any(getattr(e, "weight", None) is module.weight for e in embeddings):
            raise UnsupportedModelError(
                f"'{name}' in decoder layer {layer_index} shares its weight with the model's (tied) embeddings; "
                "quantizing it would overwrite them. Remove it from linear_groups."
            )

    def _check_submodule(self, name: str) -> None:
        try:
            self.model.get_submodule(name)
        except AttributeError as err:
            raise UnsupportedModelError(
                f"{type(self).__name__}.vision_prefixes names '{name}', which {type(self.model).__name__} does not "
                "have; fix vision_prefixes for this family."
            ) from err

    def _qualified_name(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise UnsupportedModelError(f"{type(module).__name__} is not a submodule of {type(self.model).__name__}.")


# ------------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[VLMAdapter]] = {}
_AdapterT = TypeVar("_AdapterT", bound=type[VLMAdapter])


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
    if not (isinstance(cls, type) and issubclass(cls, VLMAdapter)):
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
