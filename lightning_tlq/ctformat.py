"""What a compressed-tensors export writes, decided without weights: format, ``quantization_config``, the module
and checkpoint names of a calibration's quantized Linear modules (:func:`export_plan`) and the tensors written for
each (:func:`packed_layout`). :mod:`lightning_tlq.export` writes what this module describes; the recipe tests check
real checkpoints against it on the ``meta`` device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_tlq.core.actquant import token_activation_args
from lightning_tlq.core.pack import packed_length
from lightning_tlq.core.quantizer import QuantSpec
from lightning_tlq.keys import ModuleKey

__all__ = [
    "INT_QUANTIZED",
    "PACK_QUANTIZED",
    "PORTABLE_PACK_BITS",
    "ExportError",
    "ExportPlan",
    "export_format",
    "export_plan",
    "ignore_list",
    "packed_layout",
    "quantization_config",
]

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
PORTABLE_PACK_BITS = (2, 4, 8)
"""Bit widths whose ``pack-quantized`` layout is the same in every compressed-tensors release: before 0.20 each
int32 word held ``32 // b`` codes (wasting bits for 3, 5, 6, 7), since 0.20 codes are packed densely across words.
Only widths dividing 32 agree; vLLM's kernels read 4 and 8."""


class ExportError(ValueError):
    """The input cannot be exported as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------- config
def export_format(spec: QuantSpec, act_bits: int | None) -> str:
    """The compressed-tensors format for these settings, after checking that it can hold them.

    Raises:
        ExportError: for activation bits other than None/16/8, or weight bits ``pack-quantized`` cannot store.
    """
    if act_bits not in (None, 8, 16):
        raise ExportError(
            f"act_bits={act_bits!r} is not supported: use 8 (dynamic per-token int8 activations) or None/16 "
            "(weight-only)."
        )
    if act_bits == 8:
        return INT_QUANTIZED  # one int8 per code; any 2..8-bit width fits
    if spec.bits not in PORTABLE_PACK_BITS:
        raise ExportError(
            f"{spec.bits}-bit codes cannot be exported as {PACK_QUANTIZED}: compressed-tensors before 0.20 packed "
            f"32 // {spec.bits} = {32 // spec.bits} codes per int32 word, 0.20 packs them densely across words, so a "
            f"{spec.bits}-bit file means different things to different readers, and vLLM's kernels read only 4 and "
            f"8 bits. Re-calibrate with --quant.bits 4 (or 8, 2), or serve the fake-quantized directory as it is."
        )
    return PACK_QUANTIZED


def quantization_config(
    spec: QuantSpec, *, act_bits: int | None = None, act_order: bool = False, ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for a compressed-tensors checkpoint.

    Its fields are those llm-compressor 0.14 (compressed-tensors 0.19) writes for the same scheme, checked against
    the reference in ``tests/fixtures/export_reference`` (``tests/test_export_reference.py``): the format both at the
    top and in the config group, weight and activation arguments from :meth:`QuantSpec.compressed_tensors_args` and
    :func:`~lightning_tlq.core.actquant.token_activation_args`; observer settings and the writer's version are left
    out (they say how scales were found, not how to read them).

    Args:
        spec: the weight grid (bits, group size, symmetry).
        act_bits: None/16 for weight-only, 8 for dynamic symmetric per-token int8 activations.
        act_order: GPTQ ran with act-order; declared as ``actorder: static`` (static groups, no ``g_idx``).
        ignore: Linear module names kept in full precision.
    """
    fmt = export_format(spec, act_bits)
    return {
        "config_groups": {
            "group_0": {
                "format": fmt,
                "input_activations": token_activation_args(act_bits) if act_bits == 8 else None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": spec.compressed_tensors_args(act_order=act_order),
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def ignore_list(unquantized: Mapping[str, str]) -> list[str]:
    """The ``ignore`` list of ``quantization_config`` for the full-precision Linear modules ``unquantized`` (module
    name -> checkpoint prefix): both names of each, sorted. llm-compressor writes checkpoint names only; transformers
    matches ``ignore`` against module names, so without them it would quantize the vision tower on load."""
    return sorted(set(unquantized) | set(unquantized.values()))


# ------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ExportPlan:
    """Which Linear modules a calibration quantizes and under which names the export writes them."""

    names: dict[ModuleKey, str]
    """Calibration result key (a decoder layer's, a vision stage's or the projector's module) -> qualified module
    name."""
    quantized: dict[str, str]
    """Quantized module name -> its prefix in the weight files (``<prefix>.weight_packed``, ...)."""
    unquantized: dict[str, str]
    """Every other Linear (kept in full precision, listed in ``ignore``): module name -> checkpoint prefix."""

    @property
    def ignore(self) -> list[str]:
        """The ``ignore`` list of ``quantization_config`` (:func:`ignore_list`)."""
        return ignore_list(self.unquantized)


def export_plan(model: nn.Module, adapter: Any, keys: Iterable[ModuleKey]) -> ExportPlan:
    """Resolve the calibration's result keys to module and checkpoint names; works on the ``meta`` device, so a
    recipe's export can be checked without weights.

    Raises:
        ExportError: if a key names no ``nn.Linear`` of the model, or there is no key.
    """
    keys = list(keys)
    if not keys:
        raise ExportError("The calibration produced no quantized module; nothing to record.")
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    qualified = {id(m): name for name, m in model.named_modules()}
    vision = adapter.vision_targets() if any(k.is_vision for k in keys) else {}
    layers = {id(layer): i for i, layer in enumerate(adapter.decoder_layers())}
    layer_names = {layers[id(m)]: name for name, m in model.named_modules() if id(m) in layers}
    names = {}
    for key in keys:
        if key.is_vision:
            name = qualified[id(vision[key])]
        else:
            name = f"{layer_names[key.stage]}.{key.module}"
        if name not in linear:
            raise ExportError(f"Quantized module {name} is not an nn.Linear of the model; cannot record its codes.")
        names[key] = name
    checkpoint = _checkpoint_prefixes(model, sorted(linear))
    quantized = {n: checkpoint[n] for n in names.values()}
    return ExportPlan(names, quantized, {n: checkpoint[n] for n in sorted(linear - quantized.keys())})


def packed_layout(
    shape: Sequence[int], spec: QuantSpec, fmt: str, dtype: torch.dtype
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors the export writes for one quantized Linear of weight ``shape`` ``[out, in]`` in ``dtype``:
    suffix (``weight_packed``, ``weight_scale``, ...) -> (dtype, shape). :func:`write_packed` checks every module it
    writes against it."""
    out_features, in_features = shape
    groups = spec.n_groups(in_features)
    layout = {"weight_scale": (dtype, (out_features, groups))}
    if fmt == PACK_QUANTIZED:
        layout["weight_packed"] = (torch.int32, (out_features, packed_length(in_features, spec.bits)))
        layout["weight_shape"] = (torch.int64, (2,))
        if not spec.symmetric:
            layout["weight_zero_point"] = (torch.int32, (packed_length(out_features, spec.bits), groups))
    else:
        layout["weight"] = (torch.int8, (out_features, in_features))
        if not spec.symmetric:
            layout["weight_zero_point"] = (torch.int8, (out_features, groups))
    return layout


def _checkpoint_prefixes(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Module name -> the prefix its weight has in ``save_pretrained``'s files (transformers 5 may save legacy
    names, e.g. ``language_model.model.layers.0...`` for the module ``model.language_model.layers.0...``)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # no renaming machinery: names are saved as they are
        return {n: n for n in names}
    weights = {f"{name}.weight": model.get_submodule(name).weight for name in names}
    owner = {id(w): key[: -len(".weight")] for key, w in weights.items()}
    out = {}
    for key, tensor in revert_weight_conversion(model, weights).items():  # one pass: plain renamings keep tensors
        name = owner.get(id(tensor))
        if name is not None and key.endswith(".weight") and name not in out:
            out[name] = key[: -len(".weight")]
    for name in names:  # a weight a converter replaced (or a tied one): alone, as save_pretrained would see it
        if name not in out:
            reverted = list(revert_weight_conversion(model, {f"{name}.weight": weights[f"{name}.weight"]}))
            ok = len(reverted) == 1 and reverted[0].endswith(".weight")
            out[name] = reverted[0][: -len(".weight")] if ok else name
    return out
