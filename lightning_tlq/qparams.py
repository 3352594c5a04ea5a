"""``tlq_qparams.safetensors``: the integer codes, scales and zero points of every quantized module that a
calibration writes beside the fake-quantized weights, read back by ``lightning-tlq export``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_tlq.core.pack import pack_int32, to_unsigned, unpack_int32
from lightning_tlq.core.quantizer import QuantSpec
from lightning_tlq.ctformat import ExportError, export_plan
from lightning_tlq.keys import ModuleKey

QPARAMS_NAME = "tlq_qparams.safetensors"
_QPARAMS_FORMAT = "lightning-tlq-qparams"
_QPARAMS_VERSION = "1"


def save_qparams(
    directory: str | Path, model: nn.Module, adapter: Any, results: Mapping[ModuleKey, Any], quant: Any
) -> Path:
    """Write the integer codes, scales and zero points of a calibration run next to the saved model.

    Args:
        directory: the calibrated output directory (``save_pretrained`` already ran or runs there).
        model: the calibrated HF model.
        adapter: its :class:`~lightning_tlq.adapters.VLMAdapter` (decoder layer names, ignored prefixes).
        results: :attr:`CalibrationLoop.results`: :class:`~lightning_tlq.keys.ModuleKey` (a decoder layer's, vision
            stage's or the projector's module) -> ``ModuleResult``.
        quant: the :class:`~lightning_tlq.config.QuantArgs` used.

    Returns:
        The path of ``tlq_qparams.safetensors``.
    """
    spec: QuantSpec = quant.spec
    plan = export_plan(model, adapter, results)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for key, res in results.items():
        name = plan.names[key]
        codes = to_unsigned(res.codes, spec.bits) if spec.symmetric else res.codes.to(torch.int32)
        tensors[f"{name}.codes"] = pack_int32(codes.cpu(), spec.bits)
        tensors[f"{name}.scale"] = res.scale.detach().float().cpu().contiguous()
        if not spec.symmetric:
            tensors[f"{name}.zero"] = res.zero.detach().float().cpu().contiguous()
        modules[name] = {"shape": list(res.codes.shape), "checkpoint": plan.quantized[name]}
    act_bits = quant.act_bits
    metadata = {
        "format": _QPARAMS_FORMAT,
        "version": _QPARAMS_VERSION,
        "bits": str(spec.bits),
        "group_size": str(spec.group_size),
        "symmetric": json.dumps(spec.symmetric),
        "act_order": json.dumps(bool(quant.act_order) and quant.handler.uses_act_order),
        "act_bits": json.dumps(act_bits),
        "modules": json.dumps(modules),
        "unquantized": json.dumps(plan.unquantized),
        "ignore_prefixes": json.dumps(list(adapter.ignore_prefixes)),
    }
    path = Path(directory) / QPARAMS_NAME
    save_file(tensors, str(path), metadata=metadata)
    return path


@dataclass(frozen=True)
class QParams:
    """The contents of ``tlq_qparams.safetensors`` (tensors are read on demand by :meth:`load`)."""

    path: Path
    spec: QuantSpec
    act_order: bool
    act_bits: int | None
    modules: dict[str, dict[str, Any]]
    """Quantized module name -> ``{"shape": [out, in], "checkpoint": prefix in the weight files}``."""
    unquantized: dict[str, str]
    """Linear modules kept in full precision: module name -> checkpoint prefix."""
    ignore_prefixes: tuple[str, ...]

    def load(self, handle: Any, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """Unsigned codes ``[out, in]`` (int32), scale and zero point ``[out, n_groups]`` (float32) of ``name``."""
        out_features, in_features = self.modules[name]["shape"]
        codes = unpack_int32(handle.get_tensor(f"{name}.codes"), self.spec.bits, in_features).to(torch.int32)
        scale = handle.get_tensor(f"{name}.scale")
        groups = self.spec.n_groups(in_features, name)
        if self.spec.symmetric:
            zero = torch.full_like(scale, float(1 << (self.spec.bits - 1)))  # codes are stored offset
        else:
            zero = handle.get_tensor(f"{name}.zero")
        if codes.shape[0] != out_features or scale.shape != (out_features, groups) or zero.shape != scale.shape:
            raise ExportError(f"{self.path}: the tensors of {name} do not match its recorded shape {[out_features]}.")
        return codes, scale, zero


def read_qparams(directory: str | Path) -> QParams:
    """Read and validate the metadata of ``<directory>/tlq_qparams.safetensors``.

    Raises:
        ExportError: if the file is missing or was not written by :func:`save_qparams`.
    """
    path = Path(directory) / QPARAMS_NAME
    if not path.is_file():
        raise ExportError(
            f"{directory} has no {QPARAMS_NAME}: the integer codes of the calibration are missing (the directory was "
            "written by an older lightning-tlq, or the file was removed). Re-run `lightning-tlq calibrate`; export "
            "never re-derives codes from float weights."
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _QPARAMS_FORMAT or meta.get("version") != _QPARAMS_VERSION:
        raise ExportError(
            f"{path} is not a version-{_QPARAMS_VERSION} lightning-tlq qparams file "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r}); re-run `lightning-tlq calibrate`."
        )
    try:
        spec = QuantSpec(int(meta["bits"]), int(meta["group_size"]), bool(json.loads(meta["symmetric"])))
        return QParams(
            path=path,
            spec=spec,
            act_order=bool(json.loads(meta["act_order"])),
            act_bits=json.loads(meta["act_bits"]),
            modules=json.loads(meta["modules"]),
            unquantized=json.loads(meta["unquantized"]),
            ignore_prefixes=tuple(json.loads(meta["ignore_prefixes"])),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise ExportError(f"{path} has broken metadata ({err}); re-run `lightning-tlq calibrate`.") from err
