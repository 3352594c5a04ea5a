"""``load_packed``: build a Hugging Face model from an exported compressed-tensors directory with
:class:`~lightning_tlq.nn.packed.PackedLinear` layers, without dequantizing the weights and without
compressed-tensors.

The model is built from its config with parameters on the meta device (buffers such as rotary frequencies are
computed for real), every quantized ``nn.Linear`` is swapped for a ``PackedLinear``, and the safetensors tensors
are loaded into place; checkpoint names that transformers saves in a legacy layout are mapped back with
transformers' own renaming rules. Anything left unloaded, or any checkpoint tensor nobody claims, is an error.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lightning_tlq.core.pack import pack_int32, to_unsigned
from lightning_tlq.nn.packed import Kernel, PackedLinear

__all__ = ["PackedScheme", "load_packed", "packed_memory", "parse_quantization_config"]

_FORMATS = ("pack-quantized", "int-quantized")
_PACKED_KEYS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


@dataclass(frozen=True)
class PackedScheme:
    """What :func:`load_packed` needs from a ``quantization_config``."""

    format: str
    bits: int
    group_size: int
    symmetric: bool
    act_bits: int | None
    ignore: tuple[str, ...]

    def ignores(self, name: str) -> bool:
        """compressed-tensors matching: an exact name, or ``re:<regex>`` matched at the start of the name."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return True
            elif pattern == name:
                return True
        return False


def _bad(msg: str) -> ValueError:
    return ValueError(f"Unsupported quantization_config: {msg}")


def parse_quantization_config(qc: dict[str, Any]) -> PackedScheme:
    """Check a compressed-tensors ``quantization_config`` and extract the scheme.

    Raises:
        ValueError: naming the field that ``load_packed`` cannot handle.
    """
    if qc.get("quant_method") != "compressed-tensors":
        raise _bad(f"quant_method={qc.get('quant_method')!r}; load_packed reads compressed-tensors checkpoints.")
    if qc.get("format") not in _FORMATS:
        raise _bad(f"format={qc.get('format')!r}; supported: {_FORMATS}.")
    if qc.get("quantization_status") != "compressed":
        raise _bad(f"quantization_status={qc.get('quantization_status')!r}; expected 'compressed'.")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _bad(f"{len(groups)} config groups; load_packed handles exactly one.")
    scheme = next(iter(groups.values()))
    if scheme.get("targets") != ["Linear"]:
        raise _bad(f"targets={scheme.get('targets')!r}; expected ['Linear'].")
    w = scheme.get("weights") or {}
    if w.get("type") != "int" or w.get("strategy") not in ("group", "channel") or w.get("dynamic"):
        raise _bad(f"weights {w}; expected static int weights with strategy group or channel.")
    if w.get("actorder") in ("group", "dynamic"):
        raise _bad("actorder='group' needs a runtime g_idx, which load_packed does not implement.")
    if scheme.get("output_activations") is not None or qc.get("kv_cache_scheme") is not None:
        raise _bad("output-activation or KV-cache quantization is not implemented.")
    act = scheme.get("input_activations")
    act_bits = None
    if act is not None:
        wanted = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        if any(act.get(k) != v for k, v in wanted.items()):
            raise _bad(f"input_activations {act}; only dynamic symmetric per-token int8 is implemented.")
        act_bits = 8
    group_size = -1 if w["strategy"] == "channel" else int(w["group_size"])
    return PackedScheme(qc["format"], int(w["num_bits"]), group_size, bool(w["symmetric"]), act_bits,
                        tuple(qc.get("ignore") or ()))  # fmt: skip


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device; buffers stay real (they are computed, not loaded)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _checkpoint_to_model_prefixes(model: nn.Module) -> dict[str, str]:
    """Checkpoint module prefix -> model module prefix, for the names ``save_pretrained`` writes (transformers 5
    saves some families under legacy names, e.g. ``language_model.model.layers.0`` for
    ``model.language_model.layers.0``)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {}
    mapping = {}
    for key in model.state_dict():
        reverted = list(revert_weight_conversion(model, {key: torch.empty(0)}))
        prefix, _, attr = key.rpartition(".")
        if len(reverted) == 1 and reverted[0] != key and reverted[0].endswith(f".{attr}"):
            mapping[reverted[0][: -len(attr) - 1]] = prefix
    return mapping


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors (or index); load_packed reads safetensors only.")
    return [single]


def _swap_linears(model: nn.Module, scheme: PackedScheme, dtype: torch.dtype, kernel: Kernel) -> dict[str, Any]:
    swapped = {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or scheme.ignores(name):
            continue
        packed = PackedLinear(
            module.in_features,
            module.out_features,
            bits=scheme.bits,
            group_size=scheme.group_size,
            symmetric=scheme.symmetric,
            bias=module.bias is not None,
            act_bits=scheme.act_bits,
            dtype=dtype,
            kernel=kernel,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)
        swapped[name] = packed
    if not swapped:
        raise ValueError("No nn.Linear is left to quantize after the ignore list; is this really an export?")
    return swapped


def _assign(model: nn.Module, key: str, tensor: Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    current = getattr(owner, attr)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(current.shape)}.")
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor.to(current.dtype), requires_grad=False)
    else:
        owner._buffers[attr] = tensor.to(current.dtype)


def _load_packed_tensor(layer: PackedLinear, attr: str, tensor: Tensor, scheme: PackedScheme, key: str) -> None:
    if attr == "bias" and layer.bias is not None:
        layer.bias.data.copy_(tensor)
        return
    if scheme.format == "int-quantized" and attr == "weight":  # int8 signed codes -> packed unsigned codes
        layer.weight_packed.copy_(pack_int32(to_unsigned(tensor, scheme.bits), scheme.bits))
        return
    if scheme.format == "int-quantized" and attr == "weight_zero_point":
        tensor = pack_int32(to_unsigned(tensor, scheme.bits), scheme.bits, dim=0)
    target = getattr(layer, attr, None)
    if not isinstance(target, Tensor) or attr not in _PACKED_KEYS:
        raise ValueError(f"{key}: unexpected tensor for a {scheme.format} layer.")
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(target.shape)}.")
    if attr == "weight_shape" and tensor.tolist() != [layer.out_features, layer.in_features]:
        raise ValueError(f"{key}: weight_shape {tensor.tolist()} does not match the layer.")
    target.copy_(tensor)


def load_packed(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    kernel: Kernel = "auto",
    model_class: Any = None,
    revision: str | None = None,
) -> nn.Module:
    """Load an exported directory as a model whose quantized layers stay packed (:class:`PackedLinear`).

    Args:
        path: a directory written by ``lightning-tlq export`` (or any compressed-tensors ``pack-quantized`` /
            ``int-quantized`` checkpoint with one int weight scheme), or the hub id of one (through the Hugging Face
            cache, as ``from_pretrained``).
        device: where the model goes.
        dtype: dtype of the unquantized weights, scales and activations; default: the checkpoint's.
        kernel: ``PackedLinear`` forward path (``auto``, ``dequant``, ``int4``).
        model_class: transformers class to build (default ``AutoModelForImageTextToText``).
        revision: branch, tag or commit of a hub id.

    Returns:
        The model in eval mode.

    Raises:
        ValueError / FileNotFoundError: on an unsupported config, a missing or unexpected tensor, or a shape
            mismatch; the message names the tensor.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from lightning_tlq.hub import model_dir

    path = model_dir(path, revision)  # a local directory as given; a hub id: its cached snapshot with the weights
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(f"{path}/config.json has no quantization_config; export it with `lightning-tlq export`.")
    scheme = parse_quantization_config(qc if isinstance(qc, dict) else qc.to_dict())
    del config.quantization_config
    model_class = model_class or AutoModelForImageTextToText
    with _parameters_on_meta():
        model = model_class.from_config(config, dtype=dtype or config.dtype)
    dtype = dtype or next(iter(model.parameters())).dtype
    to_model = _checkpoint_to_model_prefixes(model)
    layers = _swap_linears(model, scheme, dtype, kernel)
    targets = set(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for ckpt_key in f.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                ckpt_prefix, _, attr = ckpt_key.rpartition(".")
                prefix = to_model.get(ckpt_prefix, ckpt_prefix)
                key = f"{prefix}.{attr}"
                if prefix in layers:
                    _load_packed_tensor(layers[prefix], attr, f.get_tensor(ckpt_key), scheme, ckpt_key)
                    loaded.add(key if attr != "weight" else f"{prefix}.weight_packed")
                elif key in targets:
                    _assign(model, key, f.get_tensor(ckpt_key))
                    loaded.add(key)
                else:
                    raise ValueError(f"{file.name}: tensor {ckpt_key} (model key {key}) has no place in the model.")
    _check_complete(model, layers, loaded, scheme)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint lacks {len(still_meta)} tensor(s), e.g. {still_meta[:3]}.")
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model.to(device).eval()


def _check_complete(model: nn.Module, layers: dict[str, PackedLinear], loaded: set[str], scheme: PackedScheme) -> None:
    for name, layer in layers.items():
        need = ["weight_packed", "weight_scale"] + ([] if scheme.symmetric else ["weight_zero_point"])
        missing = [a for a in need if f"{name}.{a}" not in loaded]
        if missing:
            raise ValueError(f"The checkpoint lacks {missing} of quantized layer {name}.")
        if layer.bias is not None and f"{name}.bias" not in loaded:
            raise ValueError(f"The checkpoint lacks the bias of quantized layer {name}.")


def packed_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantized layers: as loaded (codes + scales + zero points) and as a bf16 weight would take."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    return {
        "layers": len(layers),
        "packed_bytes": sum(m.memory_bytes() for m in layers),
        "bf16_bytes": sum(2 * m.in_features * m.out_features for m in layers),
    }
