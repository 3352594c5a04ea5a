"""``lightning-tlq export``: a calibrated directory -> a compressed-tensors checkpoint that serving stacks load.

``calibrate`` writes the fake-quantized model plus ``tlq_qparams.safetensors``: the integer codes (densely packed,
see :mod:`lightning_tlq.core.pack`), scales and zero points of every quantized module. The export is therefore
exact: it never re-derives codes from float weights, and it checks that the saved weights are the dequantized
codes before writing anything.

Formats (the layouts compressed-tensors infers for these schemes, so transformers and vLLM pick the right loader):

* ``pack-quantized`` for weight-only settings (``act_bits`` None/16): per Linear ``weight_packed`` int32
  ``[out, ceil(in*b/32)]`` (codes offset by ``+2^(b-1)``, element ``i`` at bits ``b*i``), ``weight_scale``
  ``[out, in/g]`` in the model dtype, ``weight_zero_point`` int32 packed along dim 0 (asymmetric only) and
  ``weight_shape``. Only 2, 4 and 8 bits: see :data:`PORTABLE_PACK_BITS`.
* ``int-quantized`` for ``act_bits=8`` (W8A8, W4A8): ``weight`` int8 ``[out, in]`` holding the signed codes,
  ``weight_scale`` and (asymmetric) an int8 ``weight_zero_point`` ``[out, in/g]``; activations are declared as
  dynamic symmetric per-token int8.

What is written (format, ``quantization_config``, names and tensor layout) is decided in
:mod:`lightning_tlq.ctformat`, without weights. ``config.json`` gets a ``quantization_config``
(``quant_method: compressed-tensors``, ``quantization_status: compressed``) with one group targeting ``Linear``
and an ``ignore`` list naming every Linear left in full precision (vision tower, projector, LM head), both under
the model's module names and, where transformers saves legacy names, under the checkpoint names.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_tlq.core.pack import pack_int32, to_signed
from lightning_tlq.core.quantizer import QuantSpec, dequantize
from lightning_tlq.ctformat import (
    PACK_QUANTIZED,
    PORTABLE_PACK_BITS,
    ExportError,
    ExportPlan,
    export_format,
    export_plan,
    ignore_list,
    packed_layout,
    quantization_config,
)
from lightning_tlq.qparams import QPARAMS_NAME as QPARAMS_NAME  # re-exported
from lightning_tlq.qparams import QParams as QParams  # re-exported
from lightning_tlq.qparams import read_qparams as read_qparams  # re-exported
from lightning_tlq.qparams import save_qparams as save_qparams  # re-exported
from lightning_tlq.report import REPORT_NAME, atomic_output_dir

log = logging.getLogger(__name__)

__all__ = [
    "PACKED_DIRNAME",
    "PORTABLE_PACK_BITS",
    "QPARAMS_NAME",
    "ExportError",
    "ExportPlan",
    "QParams",
    "export",
    "export_format",
    "export_plan",
    "ignore_list",
    "packed_layout",
    "quantization_config",
    "read_qparams",
    "save_qparams",
    "write_packed",
]

PACKED_DIRNAME = "packed"
_SAFE_INDEX = "model.safetensors.index.json"
_SKIP_FILES = {QPARAMS_NAME, _SAFE_INDEX}


# ----------------------------------------------------------------------------------------------------- export
def export(
    checkpoint: str,
    output_dir: str | None = None,
    overwrite: bool = False,
    act_bits: int | None = None,
    max_shard_size: str = "5GB",
    quiet: bool = False,
    revision: str | None = None,
) -> dict[str, Any]:
    """Write a calibrated directory as a compressed-tensors checkpoint (``from_pretrained``/vLLM loadable).

    Args:
        checkpoint: a directory written by ``lightning-tlq calibrate`` (fake-quantized model, ``tlq_report.json``
            and ``tlq_qparams.safetensors``), or the hub id of one (fetched through the Hugging Face cache).
        output_dir: where to write; default ``<checkpoint>/packed`` (required for a hub id).
        overwrite: replace ``output_dir`` if it exists.
        act_bits: activation scheme: None = as calibrated (``quant.act_bits`` if the run had it, else weight-only),
            16 = weight-only (``pack-quantized``), 8 = dynamic per-token int8 activations (``int-quantized``).
        max_shard_size: largest weight file, e.g. ``5GB``, ``500MB``; bigger checkpoints are sharded with an index.
        quiet: do not print the summary line.
        revision: branch, tag or commit of a hub id ``checkpoint``.

    Returns:
        A summary: output directory, format, bytes written, quantized and ignored module counts.

    Raises:
        ExportError: when the input is not a calibrated directory, lacks its codes, was modified after calibration,
            or the settings cannot be stored in the format; nothing is written then.
    """
    src = _source_dir(checkpoint, output_dir, revision)
    dst = Path(output_dir).expanduser() if output_dir is not None else src / PACKED_DIRNAME
    _check_input(src)
    with atomic_output_dir(dst, overwrite) as tmp:
        summary = write_packed(src, tmp, act_bits=act_bits, max_shard_size=max_shard_size)
    summary["output_dir"] = str(dst.resolve())
    if not quiet:
        print(
            f"lightning-tlq export: {summary['format']} W{summary['bits']}A{summary['act_bits'] or 16}, "
            f"{summary['quantized_modules']} quantized / {summary['ignored_modules']} full-precision Linear, "
            f"{summary['bytes'] / 2**20:.1f} MiB -> {summary['output_dir']}"
        )
    return summary


def write_packed(
    src: str | Path, dst: str | Path, *, act_bits: int | None = None, max_shard_size: str | int = "5GB"
) -> dict[str, Any]:
    """Write the compressed-tensors checkpoint of calibrated directory ``src`` into the existing, empty ``dst``.

    Not atomic by itself: :func:`export` and ``calibrate(export=True)`` call it inside a temporary directory.
    See :func:`export` for the arguments.
    """
    src, dst = Path(src), Path(dst)
    _check_input(src)
    qp = read_qparams(src)
    act_bits = qp.act_bits if act_bits is None else act_bits
    if act_bits == 16:
        act_bits = None
    if qp.act_bits not in (None, 16) and act_bits is None:
        log.warning("The run was calibrated with act_bits=%s; exporting weight-only as asked.", qp.act_bits)
    fmt = export_format(qp.spec, act_bits)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ExportError(f"{src}/config.json already has a quantization_config: it is an export, not a calibration.")
    shard_bytes = _parse_size(max_shard_size)
    by_key = {f"{info['checkpoint']}.weight": name for name, info in qp.modules.items()}
    by_key.update({f"{name}.weight": name for name in qp.modules})  # a directory saved with module names
    files, found = _weight_files(src), set()
    moved, weights, dtype = 0, 0, None
    writer = _ShardWriter(dst, shard_bytes)
    with safe_open(str(qp.path), framework="pt") as qf:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    tensor = f.get_tensor(key)
                    name = by_key.get(key)
                    if name is None:
                        writer.add(key, tensor)
                        continue
                    if name in found:
                        raise ExportError(f"{src}: the weight of {name} appears twice in the weight files.")
                    found.add(name)
                    prefix = key[: -len(".weight")]
                    packed, changed = _pack_module(qp, qf, name, tensor, fmt)
                    layout = packed_layout(tensor.shape, qp.spec, fmt, tensor.dtype)
                    got = {k: (t.dtype, tuple(t.shape)) for k, t in packed.items()}
                    if got != layout:  # the documented layout is what is written
                        raise ExportError(f"{name}: internal error, wrote {got}, the layout is {layout}.")
                    for suffix, t in packed.items():
                        writer.add(f"{prefix}.{suffix}", t)
                    moved += changed
                    weights += tensor.numel()
                    dtype = tensor.dtype
    missing = sorted(set(qp.modules) - found)
    if missing:
        raise ExportError(
            f"{src}: the weight files lack {len(missing)} quantized module(s), e.g. {missing[:3]}; the directory does "
            "not match its tlq_qparams.safetensors."
        )
    total = writer.close()
    if moved:
        log.warning(
            "%.1f%% of the quantized weights differ (by about one %s rounding step) from the calibrated model: the "
            "format stores weight_scale in the model dtype and readers dequantize in it, while calibration used "
            "float32 scales. Calibrate with --dtype float32 for a bit-exact export.",
            100 * moved / weights,
            dtype,
        )
    config["quantization_config"] = quantization_config(
        qp.spec, act_bits=act_bits, act_order=qp.act_order, ignore=ignore_list(qp.unquantized)
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_side_files(src, dst)
    return {
        "format": fmt,
        "bits": qp.spec.bits,
        "act_bits": act_bits,
        "quantized_modules": len(qp.modules),
        "ignored_modules": len(qp.unquantized),
        "weight_bytes": total,
        "weights_moved_by_scale_dtype": moved / max(weights, 1),
        "bytes": sum(p.stat().st_size for p in dst.iterdir() if p.is_file()),
        "files": sorted(p.name for p in dst.iterdir()),
    }


def _source_dir(checkpoint: str, output_dir: str | None, revision: str | None) -> Path:
    """A local directory as given; a hub id's cached snapshot (config, weights and ``tlq_*`` files)."""
    from lightning_tlq.hub import is_hub_id, model_dir

    src = Path(checkpoint).expanduser()
    if (src.exists() and revision is None) or not is_hub_id(str(checkpoint)):
        return src
    if output_dir is None:
        raise ExportError(
            f"{checkpoint!r} is a hub id: pass output_dir (--output_dir); the default, <checkpoint>/packed, "
            "needs a local directory."
        )
    return model_dir(checkpoint, revision, extra_patterns=("tlq_*",))


def _check_input(src: Path) -> None:
    if not src.is_dir():
        raise ExportError(f"{src} is not a directory; pass the output directory of `lightning-tlq calibrate`.")
    if not (src / REPORT_NAME).is_file():
        raise ExportError(
            f"{src} is not a lightning-tlq calibrated directory (no {REPORT_NAME}); run `lightning-tlq calibrate` "
            "first and export its output directory."
        )
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} has no config.json; it is not a saved Hugging Face model.")


def _weight_files(src: Path) -> list[Path]:
    index = src / _SAFE_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [src / n for n in names]
    else:
        files = [src / "model.safetensors"]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ExportError(f"{src} lacks the safetensors weight file(s) {absent}; export reads safetensors only.")
    return files


def _pack_module(qp: QParams, qf: Any, name: str, weight: Tensor, fmt: str) -> tuple[dict[str, Tensor], int]:
    """The compressed tensors of one module, after checking that the codes reproduce the saved weight bit for bit,
    and how many weights the stored ``weight_scale`` changes (readers dequantize in the scale dtype, so scales
    rounded to a 16-bit model dtype move some weights by one rounding step)."""
    spec = qp.spec
    codes, scale, zero = qp.load(qf, name)
    if tuple(weight.shape) != tuple(codes.shape):
        raise ExportError(f"{name}: saved weight {tuple(weight.shape)} vs recorded codes {tuple(codes.shape)}.")
    grid = QuantSpec(spec.bits, spec.group_size, symmetric=False)  # unsigned codes, explicit zero point
    expected = dequantize(codes, scale, zero, grid, dtype=weight.dtype)
    if not torch.equal(expected, weight):
        diff = (expected.float() - weight.float()).abs().max().item()
        raise ExportError(
            f"{name}: the saved weight is not the dequantized codes (max |diff| {diff:.3g}); the model files were "
            "changed after calibration or belong to another run. Re-run `lightning-tlq calibrate`."
        )
    out: dict[str, Tensor] = {"weight_scale": scale.to(weight.dtype).contiguous()}
    diff = codes.view(*scale.shape, -1) - zero.to(torch.int32).unsqueeze(-1)  # what readers compute, in weight dtype
    served = (diff.to(weight.dtype) * out["weight_scale"].unsqueeze(-1)).view_as(weight)
    changed = int((served != weight).sum())
    zero_int = zero.round().to(torch.int32)
    if fmt == PACK_QUANTIZED:
        out["weight_packed"] = pack_int32(codes, spec.bits)
        out["weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
        if not spec.symmetric:
            out["weight_zero_point"] = pack_int32(zero_int, spec.bits, dim=0)
    else:
        out["weight"] = to_signed(codes, spec.bits).to(torch.int8).contiguous()
        if not spec.symmetric:
            out["weight_zero_point"] = to_signed(zero_int, spec.bits).to(torch.int8).contiguous()
    return out, changed


class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most ``limit`` bytes (plus an index if several)."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.shards: list[dict[str, Tensor]] = [{}]
        self.sizes = [0]
        self.written: list[Path] = []

    def add(self, key: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shards[-1] and self.sizes[-1] + nbytes > self.limit:
            self._flush()
        self.shards[-1][key] = tensor.contiguous()
        self.sizes[-1] += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.shards[-1], str(path), metadata={"format": "pt"})
        self.written.append(path)
        self.shards[-1], self.sizes[-1] = {}, 0

    def close(self) -> int:
        if self.shards[-1] or not self.written:
            self._flush()
        n = len(self.written)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map, total = {}, 0
        for path, name in zip(self.written, names):
            final = self.directory / name
            path.rename(final)
            total += final.stat().st_size
            with safe_open(str(final), framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), name))
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / _SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return total


def _copy_side_files(src: Path, dst: Path) -> None:
    """Copy processor, tokenizer, generation config and the report; never the weights or the qparams."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in _SKIP_FILES or path.name == "config.json":
            continue
        if path.suffix == ".safetensors" or path.suffix == ".bin":
            continue
        shutil.copy2(path, dst / path.name)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_size(size: str | int) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ExportError(f"max_shard_size={size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes.")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if value < 1:
        raise ExportError(f"max_shard_size must be positive, got {size!r}.")
    return value
