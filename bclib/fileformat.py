"""The compressed file: plain layer specs, write, read, validate.

A compressed network is stored as a list of *plain layer specs* (small dicts of numbers and
strings, one per layer of an ``nn.Sequential``) and, for the layers with parameters, arrays.
Nothing in the file is code: the loader never unpickles, it rebuilds ``nn.Linear``,
``nn.Conv2d``, activations, pooling, ``nn.Flatten`` and BatchNorm from the specs.

File layout (all integers little-endian)::

    magic          8 bytes   b"\\x89BCLIB\\r\\n"  (a high-bit byte and CR LF catch text-mode mangling)
    version        uint16    FORMAT_VERSION (2; version 1 files, which have no flags, are read too)
    flags          uint16    FLAG_ENTROPY_CODED or 0
    header_len     uint32    length of the compressed header
    payload_len    uint32    length of the payload as stored
    header         zlib-compressed compact JSON: {"input_shape": [...], "layers": [spec, ...]}
    payload        per layer, in order (see below); with FLAG_ENTROPY_CODED one raw LZMA2 stream of it
    crc32          uint32    CRC-32 of every byte before it

Payload of a weighted layer (``linear`` / ``conv2d``)::

    input mask     ceil(n_in / 8) bytes, only when spec["masked"]: one bit per input column
                   (linear) or input channel (conv) that holds weights; the others are zero
    weights        the integers q = round(w / 2^-bits) of the stored columns, row-major, in two's
                   complement: bit-packed at ``width`` bits (ceil(n * width / 8) bytes; width 0: all
                   zero) or, entropy-coded, each in the fewest whole bytes of 1, 2, 4, 8 that hold
                   ``width`` bits (byte-aligned symbols let LZMA model them)
    bias           2 * out bytes, float16 (when spec["bias"])

The weight of the rebuilt layer is ``q * 2^-bits`` (:func:`dequantize`). A BatchNorm layer's
payload is its running mean and variance (then weight and bias when affine), float32.

Entropy coding is the last, lossless stage (Han et al.'s Deep Compression used Huffman codes):
after pruning and rounding, most stored integers of a layer are a few small values, zero above
all, so they need far fewer bits than the layer's width. LZMA2 from Python's standard library
comes close to the zeroth-order entropy of the integers on our networks.
"""
from __future__ import annotations

import json
import lzma
import math
import numbers
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._io import write_atomically

__all__ = [
    "FORMAT_VERSION", "FLAG_ENTROPY_CODED", "MAGIC", "load_compressed", "read_compressed", "write_compressed",
    "check_runs",
    "encode_compressed",
    "module_spec", "build_module", "infer_shapes", "dequantize", "signed_width", "pack_signed", "unpack_signed",
]

MAGIC = b"\x89BCLIB\r\n"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FLAG_ENTROPY_CODED = 1
# A raw LZMA2 stream carries no settings: writer and reader share these.
_LZMA_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 22},)
_PREAMBLE = struct.Struct("<8sHHII")
_CRC = struct.Struct("<I")
# Caps that keep a hostile header from asking for absurd allocations.
MAX_HEADER_BYTES = 1 << 20
MAX_TOTAL_WEIGHTS = 1 << 27
MAX_INPUT_ELEMENTS = 1 << 24
MAX_ACTIVATION_ELEMENTS = 1 << 26
# Multiply-accumulates of one example (VGG-16 at 224 x 224: 1.5e10): the loader runs one, so a header
# cannot make it compute for hours.
MAX_MULTIPLY_ACCUMULATES = 1 << 34
# Element operations of one example besides those (each layer's outputs, a pooling window's inputs):
# VGG-16 at 224 x 224 needs about 3.5e7; pooling and activations run far slower per element than a GEMM.
MAX_ELEMENT_OPERATIONS = 1 << 30
MAX_BITS = 23
MAX_WIDTH = 62
_PACK_CHUNK = 1 << 20  # values per packing chunk (a multiple of 8, so chunks end on byte boundaries)


# ----------------------------------------------------------------------------- the fixed-point grid
def dequantize(q: Tensor, bits: int) -> Tensor:
    """Weights on the fixed-point grid of step ``2^-bits``: ``w = q * 2^-bits`` (float32).

    Computed in float64 (exact for ``|q| < 2^53``), then rounded once to float32, so the writer's
    reduced-precision model and the loader get bit-identical weights.
    """
    return (q.to(torch.float64) * math.ldexp(1.0, -bits)).to(torch.float32)


# ----------------------------------------------------------------------------- bit packing
def signed_width(q: np.ndarray) -> int:
    """Fewest bits that hold every value of ``q`` in two's complement (0 when all are zero)."""
    if q.size == 0:
        return 0
    largest, smallest = int(q.max()), int(q.min())
    if largest == 0 and smallest == 0:
        return 0
    # w bits hold [-2^(w-1), 2^(w-1) - 1].
    return max(max(largest, 0).bit_length(), max(-smallest - 1, 0).bit_length()) + 1


def pack_signed(q: np.ndarray, width: int) -> bytes:
    """Pack integers into ``width``-bit two's complement fields, most significant bit first."""
    q = np.asarray(q, dtype=np.int64).ravel()
    if width == 0 or q.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    low_bits = np.uint64((1 << width) - 1)
    chunks = []
    for start in range(0, q.size, _PACK_CHUNK):
        unsigned = q[start:start + _PACK_CHUNK].view(np.uint64) & low_bits
        bits = ((unsigned[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        chunks.append(np.packbits(bits.ravel()).tobytes())
    return b"".join(chunks)


def unpack_signed(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_signed`: ``count`` signed integers of ``width`` bits from ``data``."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = (np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64))
    out = np.empty(count, dtype=np.int64)
    bytes_per_chunk = _PACK_CHUNK * width // 8
    for index, start in enumerate(range(0, count, _PACK_CHUNK)):
        n = min(_PACK_CHUNK, count - start)
        bits = np.unpackbits(raw[index * bytes_per_chunk:], count=n * width).reshape(n, width)
        unsigned = bits.astype(np.uint64) @ weights
        # Sign extension: a set top bit means value - 2^width.
        signed = unsigned.astype(np.int64)
        signed -= (signed >> (width - 1) & 1) << width
        out[start:start + n] = signed
    return out


def _packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


# ----------------------------------------------------------------------------- plain layer specs
_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def module_spec(module: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """The plain spec and tensors of a parameter-free or BatchNorm layer.

    Supported: ReLU, LeakyReLU, Tanh, Sigmoid, Identity, Dropout, MaxPool2d, AvgPool2d,
    AdaptiveAvgPool2d, Flatten (``start_dim=1, end_dim=-1``), Softmax and LogSoftmax (with a
    ``dim``), BatchNorm1d/2d with running statistics.

    Raises:
        TypeError: for any other module type or an unsupported option (the message names it).
    """
    kind = type(module)
    if kind in _ACTIVATIONS:
        return {"type": _ACTIVATIONS[kind]}, {}
    if kind is nn.LeakyReLU:
        return {"type": "leaky_relu", "slope": float(module.negative_slope)}, {}
    if kind is nn.Dropout:
        return {"type": "dropout", "p": float(module.p)}, {}
    if kind in (nn.Softmax, nn.LogSoftmax):
        if module.dim is None:
            raise TypeError(f"{kind.__name__} needs an explicit dim, got dim=None")
        return {"type": "softmax" if kind is nn.Softmax else "log_softmax", "dim": int(module.dim)}, {}
    if kind is nn.Flatten:
        if module.start_dim != 1 or module.end_dim != -1:
            raise TypeError(f"only nn.Flatten(start_dim=1, end_dim=-1) is supported, got {module}")
        return {"type": "flatten"}, {}
    if kind is nn.MaxPool2d:
        if module.return_indices:
            raise TypeError("nn.MaxPool2d(return_indices=True) is not supported")
        return {"type": "maxpool2d", **_pool_geometry(module), "dilation": _pair(module.dilation)}, {}
    if kind is nn.AvgPool2d:
        if module.divisor_override is not None:
            raise TypeError("nn.AvgPool2d(divisor_override=...) is not supported")
        return {"type": "avgpool2d", **_pool_geometry(module),
                "count_include_pad": bool(module.count_include_pad)}, {}
    if kind is nn.AdaptiveAvgPool2d:
        size = _pair(module.output_size)
        if any(s is None for s in size):
            raise TypeError("nn.AdaptiveAvgPool2d with a None output size is not supported")
        return {"type": "adaptive_avgpool2d", "output": size}, {}
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        if not module.track_running_stats or module.running_mean is None:
            raise TypeError(f"{kind.__name__} without running statistics is not supported")
        spec = {"type": "batchnorm2d" if kind is nn.BatchNorm2d else "batchnorm1d",
                "num": int(module.num_features), "eps": float(module.eps), "affine": bool(module.affine)}
        tensors = {"running_mean": module.running_mean, "running_var": module.running_var}
        if module.affine:
            tensors.update(weight=module.weight, bias=module.bias)
        return spec, {k: v.detach().float().cpu().clone() for k, v in tensors.items()}
    raise TypeError(
        f"cannot export a {kind.__name__}: supported are Bayesian conv/linear layers, ReLU, LeakyReLU, "
        "Tanh, Sigmoid, Identity, Dropout, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Softmax, LogSoftmax, "
        "BatchNorm1d/2d"
    )


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _pool_geometry(module) -> dict:
    return {"kernel": _pair(module.kernel_size), "stride": _pair(module.stride or module.kernel_size),
            "padding": _pair(module.padding), "ceil_mode": bool(module.ceil_mode)}


def build_module(specs: list[dict], tensors: list[dict[str, Tensor]]) -> nn.Sequential:
    """An ``nn.Sequential`` in eval mode from plain specs and their tensors.

    A weighted layer's tensors are ``weight`` (float32, the full exported shape) and ``bias``
    (float32, or absent); a BatchNorm's are its statistics and affine parameters.
    """
    layers = []
    for spec, values in zip(specs, tensors):
        kind = spec["type"]
        if kind == "linear":
            layer = nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
        elif kind == "conv2d":
            layer = nn.Conv2d(spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]),
                              tuple(spec["padding"]), tuple(spec["dilation"]), bias=spec["bias"])
        elif kind in ("batchnorm1d", "batchnorm2d"):
            cls = nn.BatchNorm2d if kind == "batchnorm2d" else nn.BatchNorm1d
            layer = cls(spec["num"], eps=spec["eps"], affine=spec["affine"])
        else:
            layer = _parameter_free(spec)
        with torch.no_grad():
            for key in ("weight", "bias", "running_mean", "running_var"):
                if key in values:
                    getattr(layer, key).copy_(values[key])
        layers.append(layer)
    # ReLU then max-pooling equals max-pooling then ReLU (ReLU is monotone); pooling first applies
    # the ReLU to a quarter of the values, which matters once pruning has cut the convolutions.
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ReLU) and isinstance(layers[i + 1], nn.MaxPool2d):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return nn.Sequential(*layers).eval()


def _parameter_free(spec: dict) -> nn.Module:
    kind = spec["type"]
    simple = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity, "flatten": nn.Flatten}
    if kind in simple:
        return simple[kind]()
    if kind == "leaky_relu":
        return nn.LeakyReLU(float(spec["slope"]))  # an int slope too large for C++ must not reach it
    if kind == "dropout":
        return nn.Dropout(float(spec["p"]))
    if kind in ("softmax", "log_softmax"):
        return (nn.Softmax if kind == "softmax" else nn.LogSoftmax)(spec["dim"])
    if kind == "maxpool2d":
        return nn.MaxPool2d(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"]),
                            tuple(spec["dilation"]), ceil_mode=spec["ceil_mode"])
    if kind == "avgpool2d":
        return nn.AvgPool2d(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"]),
                            ceil_mode=spec["ceil_mode"], count_include_pad=spec["count_include_pad"])
    return nn.AdaptiveAvgPool2d(tuple(spec["output"]))


# ----------------------------------------------------------------------------- spec schema
def _is_int(v, low=0, high=1 << 31) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_pair(v, low=0) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x, low, 1 << 16) for x in v)


def _is_real(v, low=-math.inf, high=math.inf) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        v = float(v)  # a JSON integer of 400 digits has no float: OverflowError
    except OverflowError:
        return False
    return math.isfinite(v) and low <= v <= high


def _is_bool(v) -> bool:
    return isinstance(v, bool)


_WEIGHTED_KEYS = {"in": lambda v: _is_int(v, 1), "out": lambda v: _is_int(v, 1), "bias": _is_bool,
                  "bits": lambda v: _is_int(v, 0, MAX_BITS), "width": lambda v: _is_int(v, 0, MAX_WIDTH),
                  "masked": _is_bool}
_POOL_KEYS = {"kernel": lambda v: _is_pair(v, 1), "stride": lambda v: _is_pair(v, 1), "padding": _is_pair,
              "ceil_mode": _is_bool}
_BN_KEYS = {"num": lambda v: _is_int(v, 1, 1 << 24), "eps": lambda v: _is_real(v, 0.0), "affine": _is_bool}
_SCHEMA: dict[str, dict[str, Any]] = {
    "linear": _WEIGHTED_KEYS,
    "conv2d": {**_WEIGHTED_KEYS, "kernel": lambda v: _is_pair(v, 1), "stride": lambda v: _is_pair(v, 1),
               "padding": _is_pair, "dilation": lambda v: _is_pair(v, 1)},
    "relu": {}, "tanh": {}, "sigmoid": {}, "identity": {}, "flatten": {},
    "leaky_relu": {"slope": _is_real},
    "dropout": {"p": lambda v: _is_real(v, 0.0, 1.0)},
    "softmax": {"dim": lambda v: _is_int(v, -8, 8)}, "log_softmax": {"dim": lambda v: _is_int(v, -8, 8)},
    "maxpool2d": {**_POOL_KEYS, "dilation": lambda v: _is_pair(v, 1)},
    "avgpool2d": {**_POOL_KEYS, "count_include_pad": _is_bool},
    "adaptive_avgpool2d": {"output": lambda v: _is_pair(v, 1)},
    "batchnorm1d": _BN_KEYS, "batchnorm2d": _BN_KEYS,
}


def _check_spec(index: int, spec) -> None:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or spec["type"] not in _SCHEMA:
        raise ValueError(f"corrupt compressed file: layer {index} has no known type ({spec!r:.80})")
    fields = _SCHEMA[spec["type"]]
    if set(spec) != set(fields) | {"type"}:
        raise ValueError(f"corrupt compressed file: layer {index} ({spec['type']}) has keys {sorted(spec)!r:.200}, "
                         f"expected {sorted(set(fields) | {'type'})}")
    for key, valid in fields.items():
        if not valid(spec[key]):
            raise ValueError(f"corrupt compressed file: layer {index} ({spec['type']}) has invalid "
                             f"{key}={spec[key]!r:.80}")


def _weight_geometry(spec: dict) -> tuple[int, int]:
    """``(input units, weights per input unit and output)``: columns for linear, channels x kernel for conv."""
    per_unit = spec["kernel"][0] * spec["kernel"][1] if spec["type"] == "conv2d" else 1
    return spec["in"], per_unit


def _weight_shape(spec: dict) -> tuple[int, ...]:
    if spec["type"] == "conv2d":
        return (spec["out"], spec["in"], *spec["kernel"])
    return (spec["out"], spec["in"])


# ----------------------------------------------------------------------------- writing
def write_compressed(path, input_shape, specs: list[dict], tensors: list[dict[str, Tensor]], *,
                     entropy_coding: bool = True) -> int:
    """Write a compressed network atomically (temporary file, then ``os.replace``); return its size in bytes.

    The bytes are those of :func:`encode_compressed` (same arguments).
    """
    blob = encode_compressed(input_shape, specs, tensors, entropy_coding=entropy_coding)
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(blob))
    return len(blob)


def encode_compressed(input_shape, specs: list[dict], tensors: list[dict[str, Tensor]], *,
                      entropy_coding: bool = True) -> bytes:
    """The bytes of a compressed file, without writing it.

    Args:
        input_shape: shape of one input example, e.g. ``(1, 28, 28)``.
        specs: plain layer specs; weighted ones (``linear``/``conv2d``) carry ``bits``.
        tensors: per layer: weighted ``q`` (int64, full weight shape), ``in_mask`` (bool, one per
            input column/channel; q must be zero outside it) and ``bias`` (float32, rounded to
            float16 here); BatchNorm ``running_mean``, ``running_var`` (and ``weight``, ``bias``).
        entropy_coding: store the payload as one LZMA2 stream of byte-aligned integers (lossless;
            the loader gives the same model either way); ``False`` keeps it bit-packed at each
            layer's width, the size the after-precision compression rate describes.

    Raises:
        TypeError: an ``input_shape`` that is not a sequence of ints, a spec or tensor dict that is
            not a dict, a tensor that is not a ``Tensor``, or ``q``/``in_mask``/a float tensor of
            another dtype.
        ValueError: ``specs`` and ``tensors`` of different lengths, a spec the loader would reject,
            a tensor missing, unexpected or of the wrong shape, or a bias float16 cannot hold (the
            message names the argument and the layer).
    """
    input_shape = _integer_shape(input_shape)
    specs, tensors = list(specs), list(tensors)
    if len(specs) != len(tensors):  # zip would drop the extra layers silently
        raise ValueError(f"specs and tensors must have one entry per layer, got {len(specs)} specs and "
                         f"{len(tensors)} tensor dicts")
    header_specs, payload = [], []
    for index, (spec, values) in enumerate(zip(specs, tensors)):
        spec = _writable_spec(index, spec)
        _check_tensor_keys(index, spec, values)
        if spec["type"] in ("linear", "conv2d"):
            spec, parts = _encode_weighted(index, spec, values, entropy_coding)
            payload += parts
        elif spec["type"] in ("batchnorm1d", "batchnorm2d"):
            for key in _batchnorm_keys(spec):
                value = _checked_tensor(index, spec, values, key, (spec["num"],), _FLOAT)
                payload.append(value.numpy().astype("<f4").tobytes())
        header_specs.append(spec)
    header_fields = {"input_shape": input_shape, "layers": header_specs}
    header_json = json.dumps(header_fields, separators=(",", ":"))
    try:
        _check_header(json.loads(header_json))  # what the loader will see
    except ValueError as error:
        raise ValueError(f"this network cannot be saved in a file load_compressed accepts: "
                         f"{str(error).removeprefix('corrupt compressed file: ')}") from None
    header = zlib.compress(header_json.encode("utf-8"), 9)
    body = b"".join(payload)
    flags = 0
    if entropy_coding:
        body, flags = lzma.compress(body, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS), FLAG_ENTROPY_CODED
    blob = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, flags, len(header), len(body)) + header + body
    return blob + _CRC.pack(zlib.crc32(blob))


def _integer_shape(input_shape) -> list[int]:
    """``input_shape`` as a list of ints; a float or bool entry is refused, not truncated."""
    try:
        shape = list(input_shape)
    except TypeError:
        shape = None
    if shape is None or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r:.80}")
    return [int(s) for s in shape]


def _writable_spec(index: int, spec) -> dict:
    """A copy of ``specs[index]``, checked against the schema before its tensors are read."""
    if not isinstance(spec, dict):
        raise TypeError(f"specs[{index}] must be a dict, got {type(spec).__name__}")
    checked = dict(spec)
    if checked.get("type") in ("linear", "conv2d"):
        checked.update(width=0, masked=False)  # the writer sets these from the tensors
    try:
        _check_spec(index, checked)
    except ValueError as error:
        raise ValueError(f"specs[{index}] cannot be saved in a file load_compressed accepts: "
                         f"{str(error).removeprefix('corrupt compressed file: ')}") from None
    return dict(spec)  # the keys in their order: the header's bytes depend on it


def _batchnorm_keys(spec: dict) -> tuple[str, ...]:
    """A BatchNorm layer's tensors, in payload order."""
    return ("running_mean", "running_var") + (("weight", "bias") if spec["affine"] else ())


def _check_tensor_keys(index: int, spec: dict, values) -> None:
    """The tensors of ``specs[index]`` are exactly those the file stores for it (an extra one would be lost)."""
    if not isinstance(values, dict):
        raise TypeError(f"layer {index} ({spec['type']}): tensors[{index}] must be a dict of tensors, "
                        f"got {type(values).__name__}")
    if spec["type"] in ("linear", "conv2d"):
        expected = {"q", "in_mask"} | ({"bias"} if spec["bias"] else set())
    elif spec["type"] in ("batchnorm1d", "batchnorm2d"):
        expected = set(_batchnorm_keys(spec))
    else:
        expected = set()
    if set(values) != expected:
        raise ValueError(f"layer {index} ({spec['type']}): tensors[{index}] has keys {sorted(map(str, values))}, "
                         f"expected {sorted(expected)}")


_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_BOOL = (torch.bool,)
_FLOAT = (torch.float16, torch.float32, torch.float64)


def _checked_tensor(index: int, spec: dict, values: dict, key: str, shape: tuple[int, ...], dtypes) -> Tensor:
    """``tensors[index][key]`` on the CPU, refused unless a Tensor of exactly ``shape`` and one of ``dtypes``."""
    value = values[key]
    name = f"layer {index} ({spec['type']}): tensors[{index}][{key!r}]"
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must be of dtype {' or '.join(map(str, dtypes))}, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
    return value.detach().cpu()


def _value_bytes(width: int) -> int:
    """Bytes per integer in an entropy-coded payload: the fewest of 1, 2, 4, 8 that hold ``width`` bits."""
    return next(size for size in (0, 1, 2, 4, 8) if 8 * size >= width)


def _encode_weighted(index: int, spec: dict, values: dict[str, Tensor],
                     entropy_coding: bool) -> tuple[dict, list[bytes]]:
    # Integers only: a float q (weights instead of grid indices) would be truncated.
    q = _checked_tensor(index, spec, values, "q", _weight_shape(spec), _INTEGER).to(torch.int64)
    in_mask = _checked_tensor(index, spec, values, "in_mask", (spec["in"],), _BOOL)
    if bool(q[:, ~in_mask].any()):
        raise ValueError(f"layer {index} ({spec['type']}): tensors[{index}]['q'] must be zero outside in_mask "
                         "(those columns are not stored)")
    stored = q[:, in_mask].numpy()
    spec["masked"] = not bool(in_mask.all())
    spec["width"] = signed_width(stored)
    if spec["width"] > MAX_WIDTH:
        raise ValueError(f"layer {index} ({spec['type']}): weights need {spec['width']} bits per value, more than "
                         f"the format's {MAX_WIDTH}")
    parts = []
    if spec["masked"]:
        parts.append(np.packbits(in_mask.numpy()).tobytes())
    if entropy_coding:
        parts.append(stored.astype(f"<i{_value_bytes(spec['width'])}").tobytes() if spec["width"] else b"")
    else:
        parts.append(pack_signed(stored, spec["width"]))
    if spec["bias"]:
        bias = _checked_tensor(index, spec, values, "bias", (spec["out"],), _FLOAT).numpy()
        with np.errstate(over="ignore"):  # an overflow is refused below, not warned about
            stored_bias = bias.astype("<f2")
        if not np.isfinite(stored_bias).all():
            unstorable = bias[~np.isfinite(stored_bias)][0]
            raise ValueError(f"layer {index} ({spec['type']}): tensors[{index}]['bias'] holds {unstorable}, which "
                             "the file's float16 biases cannot store (finite values of magnitude up to 65504 only)")
        parts.append(stored_bias.tobytes())
    return spec, parts


# ----------------------------------------------------------------------------- reading
def read_compressed(path) -> tuple[tuple[int, ...], list[dict], list[dict[str, Tensor]]]:
    """Read and validate a compressed file: ``(input_shape, specs, tensors)`` ready for :func:`build_module`.

    Raises:
        ValueError: not a bclib file, unsupported version, wrong lengths, CRC mismatch, a header that
            does not follow the schema, or sizes that do not add up (the message says which).
    """
    with open(path, "rb") as f:
        # The preamble first: its lengths bound the rest, so a huge or endless file is never read whole.
        blob = f.read(_PREAMBLE.size + _CRC.size)
        if len(blob) < _PREAMBLE.size + _CRC.size:
            raise ValueError(f"{path}: not a bclib compressed file (only {len(blob)} bytes)")
        magic, version, flags, header_len, payload_len = _PREAMBLE.unpack_from(blob)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a bclib compressed file (bad magic {magic!r})")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path}: unsupported format version {version} (this bclib reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
        expected = _PREAMBLE.size + header_len + payload_len + _CRC.size
        blob += f.read(expected - len(blob) + 1)  # one byte more reveals trailing data
    if len(blob) > expected:
        raise ValueError(f"{path}: file is longer than the {expected} bytes its lengths say (corrupt)")
    if len(blob) < expected:
        raise ValueError(f"{path}: file is {len(blob)} bytes but its lengths say {expected} (truncated or corrupt)")
    (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    if zlib.crc32(blob[:-_CRC.size]) != crc:
        raise ValueError(f"{path}: CRC-32 mismatch (the file is corrupt)")
    known_flags = FLAG_ENTROPY_CODED if version >= 2 else 0
    if flags & ~known_flags:
        raise ValueError(f"{path}: unknown flags {flags:#x} for version {version}")
    header_bytes = blob[_PREAMBLE.size:_PREAMBLE.size + header_len]
    payload = memoryview(blob)[_PREAMBLE.size + header_len:len(blob) - _CRC.size]
    input_shape, specs = _parse_header(header_bytes)
    entropy_coded = bool(flags & FLAG_ENTROPY_CODED)
    if entropy_coded:
        payload = memoryview(_inflate(payload, _max_payload_bytes(specs)))
    tensors = _decode_payload(specs, payload, entropy_coded)
    return input_shape, specs, tensors


def _max_payload_bytes(specs: list[dict]) -> int:
    """Upper bound on an entropy-coded payload's size, from the header alone (every column stored)."""
    total = 0
    for spec in specs:
        if spec["type"] in ("linear", "conv2d"):
            total += (spec["in"] + 7) // 8 + math.prod(_weight_shape(spec)) * _value_bytes(spec["width"])
            total += 2 * spec["out"] if spec["bias"] else 0
        elif spec["type"] in ("batchnorm1d", "batchnorm2d"):
            total += 4 * spec["num"] * (4 if spec["affine"] else 2)
    return total


def _inflate(data: memoryview, limit: int) -> bytes:
    """Decompress an LZMA2 payload, refusing one that is unreadable or inflates past ``limit`` bytes."""
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        raw = decompressor.decompress(bytes(data), max_length=limit + 1)
    except lzma.LZMAError as error:
        raise ValueError(f"corrupt compressed file: unreadable entropy-coded payload ({error})") from None
    if len(raw) > limit or not decompressor.eof or decompressor.unused_data:
        raise ValueError("corrupt compressed file: the entropy-coded payload does not match its header")
    return raw


def _parse_header(header_bytes: bytes) -> tuple[tuple[int, ...], list[dict]]:
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(header_bytes, MAX_HEADER_BYTES)
        if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise ValueError("header is not a complete zlib stream or is too large")
        header = json.loads(text.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"corrupt compressed file: unreadable header ({type(error).__name__}: {str(error):.200})") from None
    return _check_header(header)


def _check_header(header) -> tuple[tuple[int, ...], list[dict]]:
    """Validate a decoded header (schema, sizes, shapes, work): ``(input_shape, specs)``."""
    if not isinstance(header, dict) or set(header) != {"input_shape", "layers"}:
        raise ValueError("corrupt compressed file: header must have exactly 'input_shape' and 'layers'")
    shape, specs = header["input_shape"], header["layers"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 3 or not all(_is_int(s, 1) for s in shape)
            or math.prod(shape) > MAX_INPUT_ELEMENTS):
        raise ValueError(f"corrupt compressed file: invalid input_shape {shape!r:.80}")
    if not isinstance(specs, list) or not specs:
        raise ValueError("corrupt compressed file: 'layers' must be a non-empty list")
    total = 0
    for index, spec in enumerate(specs):
        _check_spec(index, spec)
        if spec["type"] in ("linear", "conv2d"):
            total += math.prod(_weight_shape(spec))
        elif spec["type"] in ("batchnorm1d", "batchnorm2d"):  # its statistics count as weights do
            total += spec["num"] * (4 if spec["affine"] else 2)
    if total > MAX_TOTAL_WEIGHTS:
        raise ValueError(f"corrupt compressed file: {total} weights exceed the limit {MAX_TOTAL_WEIGHTS}")
    infer_shapes(tuple(shape), specs)
    return tuple(shape), specs


def _window_output(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of a convolution or pooling window along one axis (PyTorch's rule); 0 where
    PyTorch refuses the input as too small."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    # Floor division even for a negative span: in ceil mode a window that starts inside the input
    # may overhang its end, so a window longer than the padded input still gives one output.
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return max(out, 0)


def infer_shapes(input_shape: tuple[int, ...], specs: list[dict]) -> list[tuple[int, ...]]:
    """Shape of one example after each layer, worked out from the specs alone.

    Raises:
        ValueError: when a layer does not fit the shape it receives, or an activation would exceed
            ``MAX_ACTIVATION_ELEMENTS``, or the network ``MAX_MULTIPLY_ACCUMULATES`` or
            ``MAX_ELEMENT_OPERATIONS`` (outputs and pooling windows) per example (so a
            hostile header cannot make the loader allocate gigabytes or compute for hours).
    """
    shape, shapes, work, elements = tuple(input_shape), [], 0, 0
    for index, spec in enumerate(specs):
        kind = spec["type"]
        if kind == "linear":
            ok = len(shape) == 1 and shape[0] == spec["in"]
            shape = (spec["out"],)
            work += spec["in"] * spec["out"]
        elif kind == "conv2d":
            ok = len(shape) == 3 and shape[0] == spec["in"]
            shape = (spec["out"],) + tuple(
                _window_output(s, k, st, p, d, False)
                for s, k, st, p, d in zip(shape[1:], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"])
            ) if ok else shape
            work += math.prod(shape) * spec["in"] * spec["kernel"][0] * spec["kernel"][1]
        elif kind in ("maxpool2d", "avgpool2d"):
            dilation = spec.get("dilation", [1, 1])
            ok = len(shape) == 3 and all(2 * p <= k for p, k in zip(spec["padding"], spec["kernel"]))
            shape = (shape[0],) + tuple(
                _window_output(s, k, st, p, d, spec["ceil_mode"])
                for s, k, st, p, d in zip(shape[1:], spec["kernel"], spec["stride"], spec["padding"], dilation)
            ) if ok else shape
            elements += math.prod(shape) * spec["kernel"][0] * spec["kernel"][1]  # every window's inputs
        elif kind == "adaptive_avgpool2d":
            ok = len(shape) == 3
            shape = (shape[0], *spec["output"]) if ok else shape
        elif kind == "flatten":
            ok = True
            shape = (math.prod(shape),)
        elif kind in ("batchnorm1d", "batchnorm2d"):
            # BatchNorm1d normalises (C,) and (C, L) examples alike, channels first.
            ranks = (3,) if kind == "batchnorm2d" else (1, 2)
            ok = len(shape) in ranks and shape[0] == spec["num"]
        elif kind in ("softmax", "log_softmax"):
            ok = -(len(shape) + 1) <= spec["dim"] <= len(shape)  # a dim of the batched output
        else:
            ok = True
        if not ok or min(shape) < 1 or math.prod(shape) > MAX_ACTIVATION_ELEMENTS:
            raise ValueError(f"corrupt compressed file: layer {index} ({kind}) does not fit its input or output "
                             f"shape (shape {shape})")
        if work > MAX_MULTIPLY_ACCUMULATES:
            raise ValueError(f"corrupt compressed file: layers 0..{index} take over {MAX_MULTIPLY_ACCUMULATES} "
                             "multiply-accumulates per example (the limit)")
        elements += math.prod(shape)
        if elements > MAX_ELEMENT_OPERATIONS:
            raise ValueError(f"corrupt compressed file: layers 0..{index} take over {MAX_ELEMENT_OPERATIONS} "
                             "element operations per example (the limit)")
        shapes.append(shape)
    return shapes


class _Reader:
    """Consumes the payload in order and fails cleanly when a read would run past its end."""

    def __init__(self, payload: memoryview) -> None:
        self.payload, self.offset = payload, 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.payload):
            raise ValueError("corrupt compressed file: payload shorter than its header describes")
        chunk = bytes(self.payload[self.offset:self.offset + size])
        self.offset += size
        return chunk

    def floats(self, count: int, dtype: str) -> Tensor:
        size = np.dtype(dtype).itemsize
        return torch.from_numpy(np.frombuffer(self.take(count * size), dtype=dtype).astype(np.float32))


def _decode_payload(specs: list[dict], payload: memoryview, entropy_coded: bool) -> list[dict[str, Tensor]]:
    reader = _Reader(payload)
    tensors = []
    for spec in specs:
        if spec["type"] in ("linear", "conv2d"):
            tensors.append(_decode_weighted(spec, reader, entropy_coded))
        elif spec["type"] in ("batchnorm1d", "batchnorm2d"):
            tensors.append({k: reader.floats(spec["num"], "<f4") for k in _batchnorm_keys(spec)})
        else:
            tensors.append({})
    if reader.offset != len(payload):
        raise ValueError(f"corrupt compressed file: {len(payload) - reader.offset} unexplained payload bytes")
    return tensors


def _decode_weighted(spec: dict, reader: _Reader, entropy_coded: bool) -> dict[str, Tensor]:
    n_in, per_unit = _weight_geometry(spec)
    if spec["masked"]:
        bits = np.unpackbits(np.frombuffer(reader.take((n_in + 7) // 8), dtype=np.uint8))
        if bits[n_in:].any():  # the writer pads with zeros: a set padding bit is damage
            raise ValueError("corrupt compressed file: set padding bits after an input mask")
        in_mask = bits[:n_in].astype(bool)
    else:
        in_mask = np.ones(n_in, dtype=bool)
    count = spec["out"] * int(in_mask.sum()) * per_unit
    width = spec["width"]
    if not entropy_coded:
        stored = unpack_signed(reader.take(_packed_size(count, width)), count, width)
    elif width == 0:
        stored = np.zeros(count, dtype=np.int64)
    else:
        size = _value_bytes(width)
        stored = np.frombuffer(reader.take(count * size), dtype=f"<i{size}").astype(np.int64)
        if signed_width(stored) > width:
            raise ValueError(f"corrupt compressed file: weights wider than the {width} bits their header says")
    q = torch.zeros(_weight_shape(spec), dtype=torch.int64)
    q[:, torch.from_numpy(in_mask)] = torch.from_numpy(stored).view(spec["out"], -1, *_weight_shape(spec)[2:])
    values = {"weight": dequantize(q, spec["bits"]), "in_mask": torch.from_numpy(in_mask)}
    if spec["bias"]:
        values["bias"] = reader.floats(spec["out"], "<f2")
    return values


def load_compressed(path) -> nn.Sequential:
    """Load a file written by :meth:`bclib.compression.CompressedModel.save` as a plain ``nn.Sequential``.

    The model is in eval mode and has an ``input_shape`` attribute. Its predictions equal those of
    the reduced-precision model the file was written from, bit for bit. The file is parsed, never
    unpickled.

    Args:
        path: a file written by ``CompressedModel.save`` (``str`` or ``os.PathLike``).

    Raises:
        ValueError: for a file that is truncated, corrupt, of another version or inconsistent.

    Example:
        >>> model = bclib.load_compressed("lenet5.bcz")  # doctest: +SKIP
        >>> model(torch.zeros(1, *model.input_shape)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """
    input_shape, specs, tensors = read_compressed(path)
    model = check_runs(lambda: build_module(specs, tensors), input_shape, path)
    model.input_shape = input_shape
    return model


def check_runs(build, input_shape: tuple[int, ...], path) -> nn.Module:
    """``build()``, run once on a zero example: a ValueError naming ``path`` if either fails (a
    header :func:`read_compressed` accepts can still describe a network that does not run)."""
    try:
        model = build()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, TypeError, IndexError, OverflowError) as error:
        raise ValueError(f"{path}: inconsistent architecture in compressed file ({error})") from None
    return model
