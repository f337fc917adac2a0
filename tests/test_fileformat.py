"""Tests of bclib.fileformat: bit packing by hand, exact round trips, sizes, and every kind of bad file."""
import io
import json
import lzma
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import bclib
from bclib import models
from bclib.compression import compress
from bclib.fileformat import (
    FLAG_ENTROPY_CODED, FORMAT_VERSION, MAGIC, infer_shapes, load_compressed, module_spec, pack_signed,
    read_compressed, signed_width, unpack_signed, write_compressed,
)

PREAMBLE = struct.Struct("<8sHHII")


# ----------------------------------------------------------------------------- bit packing
@pytest.mark.parametrize("values, width", [([0], 0), ([0, 0], 0), ([-1], 1), ([1], 2), ([127], 8), ([-128], 8),
                                           ([128], 9), ([-129, 5], 9), ([2**40], 42)])
def test_signed_width(values, width):
    assert signed_width(np.array(values, dtype=np.int64)) == width


def test_pack_signed_by_hand():
    # 1 -> 01, -1 -> 11, 0 -> 00, -2 -> 10: one byte 0111 0010; then 1 -> 01 padded: 0100 0000.
    assert pack_signed(np.array([1, -1, 0, -2, 1]), 2) == bytes([0b01110010, 0b01000000])
    assert pack_signed(np.array([5, -3]), 0) == b""


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 13, 23, 33, 62])
def test_pack_unpack_round_trip(width):
    rng = np.random.default_rng(width)
    low, high = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    values = np.concatenate([[low, high, 0], rng.integers(low, high, size=1001, endpoint=True)])
    packed = pack_signed(values, width)
    assert len(packed) == math.ceil(values.size * width / 8)
    assert np.array_equal(unpack_signed(packed, values.size, width), values)


# ----------------------------------------------------------------------------- a file worked out by hand
def tiny_net():
    """fc 4->3 (2 bits: step 1/4; input 3 pruned) -> ReLU -> fc 3->2 (0 bits: step 1)."""
    fc1, fc2 = bclib.LinearGroupNJ(4, 3), bclib.LinearGroupNJ(3, 2)
    with torch.no_grad():
        for layer in (fc1, fc2):
            layer.z_mu.fill_(1.0)
            layer.z_logvar.fill_(-30.0)
        fc1.z_logvar[3] = 2.0
        fc1.weight_logvar.fill_(math.log(1.5 * 2**-4))  # 2 Var = 1.5 * 2^-3: t = 1, 2
        fc2.weight_logvar.fill_(math.log(1.5 * 2**-2))  # 2 Var = 0.75: no t
        fc1.weight_mu.copy_(torch.tensor([[0.25, -0.75, 0.5, 9.0], [0.0, 0.74, -0.5, 9.0], [0.26, 0.0, -0.26, 9.0]]))
        fc2.weight_mu.copy_(torch.tensor([[1.0, -2.0, 0.2], [0.0, 1.4, -1.6]]))
        fc1.bias_mu.copy_(torch.tensor([0.1, -0.2, 0.3]))
        fc2.bias_mu.copy_(torch.tensor([1.0, 2.0]))
    return nn.Sequential(fc1, nn.ReLU(), fc2)


def test_hand_worked_file_layout(tmp_path):
    result = compress(tiny_net(), 0.0)
    assert [r.bits for r in result.report.layers] == [2, 0]
    path = tmp_path / "tiny.bcz"
    saved = result.save(path, entropy_coding=False)
    blob = path.read_bytes()
    magic, version, flags, header_len, payload_len = PREAMBLE.unpack_from(blob)
    assert (magic, version, flags) == (MAGIC, FORMAT_VERSION, 0)
    # fc1: q = w * 4 on columns 0-2 -> [[1, -3, 2], [0, 3, -2], [1, 0, -1]], width 3 (27 bits, 4 bytes),
    # a 1-byte input mask (column 3 dead), 3 float16 biases; fc2: q = round(w) -> [[1, -2, 0], [0, 1, -2]],
    # width 2 (12 bits, 2 bytes), 2 float16 biases.
    q1 = [1, -3, 2, 0, 3, -2, 1, 0, -1]
    q1_bits = "".join(format(v & 0b111, "03b") for v in q1).ljust(32, "0")
    q2_bits = "".join(format(v & 0b11, "02b") for v in [1, -2, 0, 0, 1, -2]).ljust(16, "0")
    expected_payload = (
        bytes([0b11100000]) + int(q1_bits, 2).to_bytes(4, "big")
        + np.array([0.1, -0.2, 0.3], dtype="<f2").tobytes()
        + int(q2_bits, 2).to_bytes(2, "big") + np.array([1.0, 2.0], dtype="<f2").tobytes()
    )
    payload = blob[PREAMBLE.size + header_len:-4]
    assert payload == expected_payload and payload_len == 17
    assert len(blob) == PREAMBLE.size + header_len + 17 + 4 == saved.file_bytes == os.path.getsize(path)
    assert struct.unpack("<I", blob[-4:])[0] == zlib.crc32(blob[:-4])
    header_text = zlib.decompress(blob[PREAMBLE.size:PREAMBLE.size + header_len])
    # Byte for byte, key order included: a saved file read back and saved again must not change.
    assert header_text == (b'{"input_shape":[4],"layers":[{"type":"linear","in":4,"out":3,"bias":true,"bits":2,'
                           b'"masked":true,"width":3},{"type":"relu"},{"type":"linear","in":3,"out":2,"bias":true,'
                           b'"bits":0,"masked":false,"width":2}]}')
    header = json.loads(header_text)
    assert header["input_shape"] == [4]
    assert [spec["type"] for spec in header["layers"]] == ["linear", "relu", "linear"]
    assert header["layers"][0] == {"type": "linear", "in": 4, "out": 3, "bias": True, "bits": 2, "width": 3, "masked": True}
    # Dense original: 4 bytes x (12 + 3 + 6 + 2) parameters.
    assert saved.dense_float32_bytes == 4 * 23 and saved.file_ratio == pytest.approx(92 / len(blob))
    loaded = load_compressed(path)
    assert torch.equal(loaded[0].weight, torch.tensor([[0.25, -0.75, 0.5, 0], [0, 0.75, -0.5, 0], [0.25, 0, -0.25, 0]]))
    assert torch.equal(loaded[2].weight, torch.tensor([[1.0, -2.0, 0.0], [0.0, 1.0, -2.0]]))
    assert torch.equal(loaded[0].bias, torch.tensor([0.1, -0.2, 0.3]).half().float())
    # A padding bit of the 4-column mask set (0b11100001; the CRC made right): damage, not a fifth column.
    header_bytes = blob[PREAMBLE.size:PREAMBLE.size + header_len]
    damaged = make_file(tmp_path / "padded.bcz", None, bytes([0b11100001]) + payload[1:], flags=0,
                        raw_header=header_bytes)
    with pytest.raises(ValueError, match="set padding bits after an input mask"):
        load_compressed(damaged)


def test_hand_worked_entropy_coded_payload(tmp_path):
    # The same network entropy-coded: the payload is one raw LZMA2 stream of the byte-aligned layout.
    path = tmp_path / "tiny.bcz"
    compress(tiny_net(), 0.0).save(path)
    blob = path.read_bytes()
    magic, version, flags, header_len, payload_len = PREAMBLE.unpack_from(blob)
    assert (magic, version, flags) == (MAGIC, FORMAT_VERSION, FLAG_ENTROPY_CODED)
    stored = blob[PREAMBLE.size + header_len:-4]
    assert len(stored) == payload_len
    raw = lzma.decompress(stored, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 22}])
    # fc1: mask byte, nine int8 values of width 3, three float16 biases; fc2: six int8 values, two biases.
    expected = (bytes([0b11100000]) + np.array([1, -3, 2, 0, 3, -2, 1, 0, -1], dtype="i1").tobytes()
                + np.array([0.1, -0.2, 0.3], dtype="<f2").tobytes()
                + np.array([1, -2, 0, 0, 1, -2], dtype="i1").tobytes() + np.array([1.0, 2.0], dtype="<f2").tobytes())
    assert raw == expected
    assert torch.equal(load_compressed(path)[0].weight,
                       torch.tensor([[0.25, -0.75, 0.5, 0], [0, 0.75, -0.5, 0], [0.25, 0, -0.25, 0]]))


def test_entropy_coding_approaches_the_entropy_of_the_weights(tmp_path):
    # One 300 x 784 layer whose integers are 0 with probability 0.9 and +-1, +-2 otherwise: its
    # zeroth-order entropy, worked out from the probabilities, is the floor of any symbol coder.
    rng = np.random.default_rng(0)
    probabilities = np.array([0.9, 0.03, 0.03, 0.02, 0.02])
    q = rng.choice([0, 1, -1, 2, -2], size=(300, 784), p=probabilities)
    entropy_bytes = q.size * float(-(probabilities * np.log2(probabilities)).sum()) / 8
    spec = {"type": "linear", "in": 784, "out": 300, "bias": False, "bits": 4}
    tensors = [{"q": torch.from_numpy(q), "in_mask": torch.ones(784, dtype=torch.bool)}]
    packed = write_compressed(tmp_path / "packed.bcz", (784,), [spec], tensors, entropy_coding=False)
    coded = write_compressed(tmp_path / "coded.bcz", (784,), [spec], tensors)
    assert packed > q.size * 3 / 8  # width 3
    assert coded < 1.3 * entropy_bytes + 200 and coded < packed / 3
    for name in ("packed.bcz", "coded.bcz"):
        assert torch.equal(load_compressed(tmp_path / name)[0].weight, torch.from_numpy(q).float() / 16)


@pytest.mark.parametrize("width", [1, 2, 8, 9, 16, 17, 32, 33, 53])
def test_entropy_coded_widths_round_trip(tmp_path, width):
    # Integers at both ends of the width's range are stored in 1, 2, 4 or 8 bytes and read back exactly.
    rng = np.random.default_rng(width)
    low, high = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    q = np.concatenate([[low, high, 0], rng.integers(low, high, size=37, endpoint=True)]).reshape(4, 10)
    bits = min(width, 23)
    spec = {"type": "linear", "in": 10, "out": 4, "bias": False, "bits": bits}
    tensors = [{"q": torch.from_numpy(q), "in_mask": torch.ones(10, dtype=torch.bool)}]
    write_compressed(tmp_path / "w.bcz", (10,), [spec], tensors)
    _, specs, loaded = read_compressed(tmp_path / "w.bcz")
    assert specs[0]["width"] == width
    # The weights are float32: q * 2^-bits rounded once to float32 (exact up to 24 significant bits).
    expected = torch.from_numpy(q).double().mul(2.0 ** -bits).float()
    assert torch.equal(loaded[0]["weight"], expected)
    if width <= 24:
        assert torch.equal((loaded[0]["weight"].double() * 2.0 ** bits).to(torch.int64), torch.from_numpy(q))


# ----------------------------------------------------------------------------- round trips
def forced_pruning(model, prior, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            if prior == "svd":
                layer.weight_logvar[torch.rand(layer.weight_shape) < 0.8] = 5.0
            else:
                layer.z_logvar[torch.rand(layer.num_groups) < 0.6] = 2.0
    return model


@pytest.mark.parametrize("build", [models.lenet_300_100, models.lenet5_caffe])
@pytest.mark.parametrize("prior", ["nj", "svd"])
@pytest.mark.parametrize("entropy_coding", [True, False])
def test_round_trip_is_exact(tmp_path, build, prior, entropy_coding):
    result = compress(forced_pruning(build(prior), prior, 0), 0.0)
    path = tmp_path / "model.bcz"
    saved = result.save(path, entropy_coding=entropy_coding)
    assert result.file_bytes(entropy_coding=entropy_coding) == saved.file_bytes == path.stat().st_size
    loaded = load_compressed(path)
    assert loaded.input_shape == (1, 28, 28) and not loaded.training
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded(x), result.reduced_precision_model()(x))
    # Header, masks and biases included, the file is at least 0.9x the theoretical after-precision rate.
    assert saved.file_ratio >= 0.9 * result.report.compression_precision
    assert result.report.file is saved and "bytes" in str(result.report)


def test_round_trip_with_batchnorm(tmp_path):
    torch.manual_seed(4)
    model = models.vgg_cifar("nj", width=0.0625)
    with torch.no_grad():
        for _, layer in bclib.bayesian_layers(model):
            layer.z_logvar[torch.rand(layer.num_groups) < 0.3] = 2.0
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
    result = compress(model, 0.0)
    result.save(tmp_path / "vgg.bcz")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_compressed(tmp_path / "vgg.bcz")(x), result.reduced_precision_model()(x))


def test_round_trip_with_batchnorm1d_over_channels_and_length(tmp_path):
    """nn.BatchNorm1d on (C, L) examples (a legal input compress accepts) saves and loads; the file
    normalises each channel over its length as the running statistics say."""
    from bclib.compression import CompressedModel

    torch.manual_seed(0)
    norm = nn.BatchNorm1d(4)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    net = nn.Sequential(norm, nn.Flatten(), bclib.LinearGroupNJ(20, 3), nn.ReLU(), bclib.LinearGroupNJ(3, 2)).eval()
    result = compress(net, 100.0, input_shape=(4, 5))
    path = tmp_path / "bn1d.bcz"
    result.save(path)
    loaded = load_compressed(path)
    assert loaded.input_shape == (4, 5)
    x = torch.randn(8, 4, 5)
    mean, var = norm.running_mean[:, None], norm.running_var[:, None]
    by_hand = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None] + norm.bias[:, None]
    assert torch.allclose(loaded[0](x), by_hand, atol=1e-6)
    assert torch.equal(loaded[0](x), result.model[0](x))
    assert torch.equal(loaded(x), result.reduced_precision_model()(x))
    from_file = CompressedModel.from_file(path, result.report.to_dict())
    assert torch.equal(from_file.model(x), loaded(x))


def test_round_trip_with_a_ceil_mode_window_overhanging_the_input(tmp_path):
    """A 4 x 4 max-pooling window of stride 2 in ceil mode on a 3 x 3 map starts inside it and
    overhangs: PyTorch gives one output (it was refused as none)."""
    net = nn.Sequential(bclib.Conv2dGroupNJ(1, 2, 3), nn.ReLU(), nn.MaxPool2d(4, stride=2, ceil_mode=True),
                        nn.Flatten(), bclib.LinearGroupNJ(2, 3)).eval()
    assert nn.MaxPool2d(4, stride=2, ceil_mode=True)(torch.zeros(1, 2, 3, 3)).shape == (1, 2, 1, 1)
    result = compress(net, 100.0, input_shape=(1, 5, 5))
    result.save(tmp_path / "ceil.bcz")
    x = torch.randn(8, 1, 5, 5)
    assert torch.equal(load_compressed(tmp_path / "ceil.bcz")(x), result.reduced_precision_model()(x))


# ----------------------------------------------------------------------------- geometry
def torch_output_side(layer, size: int) -> int:
    """The output side PyTorch gives a size x size map, 0 where it refuses the map as too small."""
    try:
        return layer(torch.zeros(1, 1, size, size)).shape[-1]
    except RuntimeError:
        return 0


def inferred_side(spec: dict, size: int) -> int:
    try:
        return infer_shapes((1, size, size), [spec])[0][-1]
    except ValueError:
        return 0


def test_window_output_sizes_match_torch():
    """Pooling and convolution output sizes from the specs alone equal those PyTorch computes, over a
    grid of sizes, kernels, strides, paddings (up to half the kernel, as pooling requires),
    dilations and both ceil modes (in ceil mode a window may start inside the input and overhang it)."""
    mismatches = []
    for size, kernel, stride, dilation in np.ndindex(8, 5, 4, 3):
        size, kernel, stride, dilation = size + 1, kernel + 1, stride + 1, dilation + 1
        for padding in range(kernel // 2 + 1):
            geometry = {"kernel": [kernel] * 2, "stride": [stride] * 2, "padding": [padding] * 2}
            for ceil_mode in (False, True):
                cases = [(nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode),
                          {"type": "maxpool2d", **geometry, "dilation": [dilation] * 2, "ceil_mode": ceil_mode})]
                if dilation == 1:
                    cases.append((nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode),
                                  {"type": "avgpool2d", **geometry, "ceil_mode": ceil_mode, "count_include_pad": True}))
                if not ceil_mode:
                    cases.append((nn.Conv2d(1, 1, kernel, stride, padding, dilation, bias=False),
                                  {"type": "conv2d", "in": 1, "out": 1, "bias": False, "bits": 0, "width": 0,
                                   "masked": False, **geometry, "dilation": [dilation] * 2}))
                for layer, spec in cases:
                    expected = torch_output_side(layer, size)
                    if inferred_side(spec, size) != expected:
                        mismatches.append((spec["type"], size, kernel, stride, padding, dilation, ceil_mode, expected))
    assert mismatches == []


def test_batchnorm1d_takes_channels_or_channels_by_length():
    spec = {"type": "batchnorm1d", "num": 4, "eps": 1e-5, "affine": False}
    assert infer_shapes((4,), [spec]) == [(4,)]
    assert infer_shapes((4, 5), [spec]) == [(4, 5)]
    nn.BatchNorm1d(4).eval()(torch.zeros(2, 4, 5))  # what PyTorch accepts, channels first
    for shape in ((5, 4), (4, 5, 6)):
        with pytest.raises(ValueError, match="does not fit"):
            infer_shapes(shape, [spec])


# ----------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module", params=[True, False], ids=["entropy-coded", "bit-packed"])
def lenet5_file(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("files") / "lenet5.bcz"
    compress(forced_pruning(models.lenet5_caffe("nj"), "nj", 1), 0.0).save(path, entropy_coding=request.param)
    return path


def test_truncation_at_many_offsets(lenet5_file, tmp_path):
    blob = lenet5_file.read_bytes()
    bad = tmp_path / "cut.bcz"
    offsets = sorted(set(range(0, 64)) | set(np.linspace(64, len(blob) - 1, 60).astype(int).tolist()))
    for offset in offsets:
        bad.write_bytes(blob[:offset])
        with pytest.raises(ValueError):
            load_compressed(bad)


def test_random_byte_flips(lenet5_file, tmp_path):
    blob = lenet5_file.read_bytes()
    rng = np.random.default_rng(5)
    bad = tmp_path / "flipped.bcz"
    for position in rng.choice(len(blob), size=150, replace=False).tolist() + [0, 8, 12, 16, len(blob) - 1]:
        corrupted = bytearray(blob)
        corrupted[position] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(corrupted))
        with pytest.raises(ValueError):
            load_compressed(bad)
    extended = tmp_path / "longer.bcz"
    extended.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="longer than the .* bytes its lengths say"):
        load_compressed(extended)


def make_file(path, header, payload=b"", version=FORMAT_VERSION, flags=0, raw_header=None):
    """A file with a valid CRC around any header and payload, to reach the checks behind the CRC."""
    header_bytes = raw_header if raw_header is not None else zlib.compress(json.dumps(header).encode())
    blob = PREAMBLE.pack(MAGIC, version, flags, len(header_bytes), len(payload)) + header_bytes + payload
    path.write_bytes(blob + struct.pack("<I", zlib.crc32(blob)))
    return path


LINEAR = {"type": "linear", "in": 2, "out": 1, "bias": False, "bits": 1, "width": 2, "masked": False}
GOOD_PAYLOAD = pack_signed(np.array([1, -1]), 2)


def lzma_raw(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 22}])


def test_softmax_layers_by_hand(tmp_path):
    # One weight of 0.5 and one of -0.5 (grid step 1/2) into two outputs, then a (log-)softmax.
    two_out = {**LINEAR, "in": 1, "out": 2}
    for kind, expected in (("softmax", torch.softmax), ("log_softmax", torch.log_softmax)):
        header = {"input_shape": [1], "layers": [two_out, {"type": kind, "dim": 1}]}
        model = load_compressed(make_file(tmp_path / f"{kind}.bcz", header, GOOD_PAYLOAD))
        assert type(model[1]) is (nn.Softmax if kind == "softmax" else nn.LogSoftmax) and model[1].dim == 1
        x = torch.tensor([[2.0]])  # logits 1 and -1
        assert torch.allclose(model(x), expected(torch.tensor([[1.0, -1.0]]), dim=1))
    with pytest.raises(TypeError, match="Softmax needs an explicit dim"):
        module_spec(nn.Softmax())


def test_make_file_helper_writes_a_valid_file(tmp_path):
    header = {"input_shape": [2], "layers": [LINEAR]}
    for version in (1, 2):  # version 1 files (bit-packed, no flags) still load
        model = load_compressed(make_file(tmp_path / "ok.bcz", header, GOOD_PAYLOAD, version=version))
        assert torch.equal(model[0].weight, torch.tensor([[0.5, -0.5]]))
    coded = make_file(tmp_path / "coded.bcz", header, lzma_raw(bytes([1, 255])), flags=FLAG_ENTROPY_CODED)
    assert torch.equal(load_compressed(coded)[0].weight, torch.tensor([[0.5, -0.5]]))


@pytest.mark.parametrize("header, match", [
    ({"input_shape": [2]}, "exactly 'input_shape' and 'layers'"),
    ([1, 2], "exactly 'input_shape' and 'layers'"),
    ({"input_shape": [2], "layers": []}, "non-empty list"),
    ({"input_shape": [0], "layers": [LINEAR]}, "input_shape"),
    ({"input_shape": [2.0], "layers": [LINEAR]}, "input_shape"),
    ({"input_shape": [2], "layers": [{"type": "pickle"}]}, "no known type"),
    ({"input_shape": [2], "layers": [{**LINEAR, "extra": 1}]}, "has keys"),
    ({"input_shape": [2], "layers": [{k: v for k, v in LINEAR.items() if k != "bits"}]}, "has keys"),
    ({"input_shape": [2], "layers": [{**LINEAR, "bits": 24}]}, "invalid bits"),
    ({"input_shape": [2], "layers": [{**LINEAR, "in": True}]}, "invalid in"),
    ({"input_shape": [2], "layers": [{**LINEAR, "out": -1}]}, "invalid out"),
    ({"input_shape": [2], "layers": [{**LINEAR, "width": 63}]}, "invalid width"),
    ({"input_shape": [3], "layers": [LINEAR]}, "does not fit"),
    ({"input_shape": [2], "layers": [{**LINEAR, "in": 1 << 20, "out": 1 << 20}]}, "exceed the limit"),
    ({"input_shape": [1, 4, 4], "layers": [{"type": "adaptive_avgpool2d", "output": [60000, 60000]}]}, "does not fit"),
    ({"input_shape": [1, 4, 4], "layers": [{"type": "maxpool2d", "kernel": [2, 2], "stride": [2, 2], "padding": [3, 3],
                                            "dilation": [1, 1], "ceil_mode": False}]}, "does not fit"),
    ({"input_shape": [2], "layers": [{"type": "dropout", "p": 2.0}]}, "invalid p"),
    ({"input_shape": [2], "layers": [LINEAR, {"type": "log_softmax", "dim": 99}]}, "invalid dim"),
    ({"input_shape": [2], "layers": [LINEAR, {"type": "softmax", "dim": True}]}, "invalid dim"),
    ({"input_shape": [2], "layers": [LINEAR, {"type": "softmax"}]}, "has keys"),
    ({"input_shape": [2], "layers": [{"type": "batchnorm1d", "num": 2, "eps": float("nan"), "affine": False}]}, "invalid eps"),
    ({"input_shape": [2], "layers": [{"type": ["linear"]}]}, "no known type"),
    # No weights stored (width 0), 256 x 256 kernels over 1200 x 1200: 1.2e11 multiply-accumulates.
    ({"input_shape": [1, 1200, 1200], "layers": [{"type": "conv2d", "in": 1, "out": 2, "bias": False, "bits": 0,
                                                  "width": 0, "masked": False, "kernel": [256, 256],
                                                  "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}]},
     "multiply-accumulates per example"),
    # A dim the schema allows but the network's batched 1-d output (2 dims) does not have.
    ({"input_shape": [2], "layers": [LINEAR, {"type": "softmax", "dim": 5}]}, "does not fit"),
    ({"input_shape": [2], "layers": [LINEAR, {"type": "softmax", "dim": -3}]}, "does not fit"),
    # A JSON integer of 400 digits has no float (it raised OverflowError).
    ({"input_shape": [2], "layers": [LINEAR, {"type": "leaky_relu", "slope": 10**400}]}, "invalid slope"),
    # Work no multiply-accumulate counts: 257 x 257 windows of 256 x 256 pixels (4.3e9 reads; seconds).
    ({"input_shape": [1, 512, 512], "layers": [{"type": "maxpool2d", "kernel": [256, 256], "stride": [1, 1],
                                                "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False}]},
     "element operations per example"),
    # 300 activations of 4.2e6 elements each.
    ({"input_shape": [1, 2048, 2048], "layers": [{"type": "tanh"}] * 300}, "element operations per example"),
    # BatchNorm statistics count with the weights: three layers of 2^24 channels, 4 tensors each.
    ({"input_shape": [1 << 24], "layers": [{"type": "batchnorm1d", "num": 1 << 24, "eps": 1e-5, "affine": True}] * 3},
     "exceed the limit"),
])
def test_invalid_headers(tmp_path, header, match):
    with pytest.raises(ValueError, match=match):
        load_compressed(make_file(tmp_path / "bad.bcz", header, GOOD_PAYLOAD))


def test_error_messages_stay_short_for_huge_values(tmp_path):
    header = {"input_shape": [2], "layers": [{**LINEAR, "bits": list(range(100000))}]}
    with pytest.raises(ValueError, match="invalid bits") as info:
        load_compressed(make_file(tmp_path / "long.bcz", header, GOOD_PAYLOAD))
    assert len(str(info.value)) < 300
    with pytest.raises(ValueError, match="invalid input_shape") as info:
        load_compressed(make_file(tmp_path / "shape.bcz", {"input_shape": list(range(100000)), "layers": [LINEAR]}))
    assert len(str(info.value)) < 300


def test_from_file_rejects_what_load_compressed_rejects(tmp_path):
    """A slope the schema accepts but PyTorch cannot hold in float32 fails the network's run: from_file
    refuses the file as load_compressed does (it returned a network that failed later)."""
    from bclib.compression import CompressedModel

    report = compress(nn.Sequential(bclib.LinearGroupNJ(2, 1)).eval(), 100.0).with_bits([1]).report.to_dict()
    header = {"input_shape": [2], "layers": [LINEAR, {"type": "leaky_relu", "slope": 1e308}]}
    path = make_file(tmp_path / "slope.bcz", header, GOOD_PAYLOAD)
    with pytest.raises(ValueError, match="inconsistent architecture"):
        load_compressed(path)
    with pytest.raises(ValueError, match="inconsistent architecture"):
        CompressedModel.from_file(path, report)
    good = make_file(tmp_path / "good.bcz", {"input_shape": [2], "layers": [LINEAR]}, GOOD_PAYLOAD)
    assert torch.equal(CompressedModel.from_file(good, report).model[0].weight, torch.tensor([[0.5, -0.5]]))


def test_invalid_containers(tmp_path):
    header = {"input_shape": [2], "layers": [LINEAR]}
    with pytest.raises(ValueError, match="version 3"):
        load_compressed(make_file(tmp_path / "v.bcz", header, GOOD_PAYLOAD, version=3))
    with pytest.raises(ValueError, match="flags"):
        load_compressed(make_file(tmp_path / "f.bcz", header, GOOD_PAYLOAD, version=1, flags=FLAG_ENTROPY_CODED))
    with pytest.raises(ValueError, match="flags"):
        load_compressed(make_file(tmp_path / "g.bcz", header, GOOD_PAYLOAD, flags=2))
    with pytest.raises(ValueError, match="unreadable header"):
        load_compressed(make_file(tmp_path / "z.bcz", None, GOOD_PAYLOAD, raw_header=b"not zlib"))
    with pytest.raises(ValueError, match="unreadable header"):
        load_compressed(make_file(tmp_path / "j.bcz", None, GOOD_PAYLOAD, raw_header=zlib.compress(b"{nope")))
    trailing = zlib.compress(json.dumps(header).encode()) + b"any trailing junk"  # after the zlib stream
    with pytest.raises(ValueError, match="unreadable header"):
        load_compressed(make_file(tmp_path / "t.bcz", None, GOOD_PAYLOAD, raw_header=trailing))
    with pytest.raises(ValueError, match="unreadable header .*RecursionError"):
        load_compressed(make_file(tmp_path / "r.bcz", None, GOOD_PAYLOAD, raw_header=zlib.compress(b"[" * 200000)))
    bomb = zlib.compress(b" " * (2 << 20))  # inflates past the 1 MiB header limit
    with pytest.raises(ValueError, match="unreadable header"):
        load_compressed(make_file(tmp_path / "b.bcz", None, GOOD_PAYLOAD, raw_header=bomb))
    with pytest.raises(ValueError, match="payload shorter"):
        load_compressed(make_file(tmp_path / "s.bcz", header, GOOD_PAYLOAD[:0]))
    with pytest.raises(ValueError, match="unexplained payload bytes"):
        load_compressed(make_file(tmp_path / "l.bcz", header, GOOD_PAYLOAD + b"\0"))


@pytest.mark.parametrize("payload, match", [
    (b"\xffnot lzma", "unreadable entropy-coded payload"),
    (lzma_raw(bytes(10 << 20)), "does not match its header"),  # inflates far past the 2 bytes the header allows
    (lzma_raw(bytes([1, 255])) + b"\0", "does not match its header"),  # data after the stream's end
    (lzma_raw(bytes([1])), "payload shorter"),
    (lzma_raw(bytes([1, 2])), "wider than the 2 bits"),  # 2 does not fit in 2-bit two's complement
])
def test_invalid_entropy_coded_payloads(tmp_path, payload, match):
    header = {"input_shape": [2], "layers": [LINEAR]}
    with pytest.raises(ValueError, match=match):
        load_compressed(make_file(tmp_path / "bad.bcz", header, payload, flags=FLAG_ENTROPY_CODED))


def test_not_a_bclib_file(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(models.lenet_300_100(None).state_dict(), path)
    with pytest.raises(ValueError, match="not a bclib compressed file"):
        load_compressed(path)
    (tmp_path / "empty.bcz").write_bytes(b"")
    with pytest.raises(ValueError, match="not a bclib compressed file"):
        read_compressed(tmp_path / "empty.bcz")


def test_an_endless_file_is_not_read_whole(tmp_path, monkeypatch):
    """Only the preamble and the lengths it gives are read: /dev/zero-like input stops at once."""
    class Endless(io.RawIOBase):
        requested = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            Endless.requested += len(buffer)
            blob = PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, 10, 10)
            buffer[:] = (blob * (len(buffer) // len(blob) + 1))[:len(buffer)]
            return len(buffer)

    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: io.BufferedReader(Endless()))
    with pytest.raises(ValueError, match="longer than the 44 bytes"):
        read_compressed("endless.bcz")
    assert Endless.requested < 1 << 20


def test_save_refuses_what_the_loader_would_reject(tmp_path):
    """compress accepts an input shape of four dimensions; the file format holds one to three."""
    net = nn.Sequential(nn.Flatten(), bclib.LinearGroupNJ(4, 3), nn.ReLU(), bclib.LinearGroupNJ(3, 2)).eval()
    compressed = bclib.compress(net, -3.0, input_shape=(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"cannot be saved in a file load_compressed accepts: invalid input_shape"):
        compressed.save(tmp_path / "net.bcz")
    assert list(tmp_path.iterdir()) == []


BN_SPEC = {"type": "batchnorm1d", "num": 2, "eps": 1e-5, "affine": False}
FC = {"type": "linear", "in": 2, "out": 2, "bias": True, "bits": 0}
FC_VALUES = {"q": torch.tensor([[1, 0], [0, 1]]), "in_mask": torch.ones(2, dtype=torch.bool), "bias": torch.zeros(2)}
CONV = {"type": "conv2d", "in": 1, "out": 1, "bias": False, "bits": 0, "kernel": [2, 2], "stride": [1, 1],
        "padding": [0, 0], "dilation": [1, 1]}


@pytest.mark.parametrize("input_shape, specs, tensors, error, match", [
    # Statistics of another length than num: read back shifted (mean [1, 2], var [3, 4]).
    ((2,), [BN_SPEC], [{"running_mean": torch.tensor([1.0, 2, 3]), "running_var": torch.tensor([4.0])}],
     ValueError, r"layer 0 \(batchnorm1d\): tensors\[0\]\['running_mean'\] has shape \(3,\), expected \(2,\)"),
    ((2,), [BN_SPEC], [{"running_mean": torch.zeros(2), "running_var": torch.ones(2, 1)}],
     ValueError, r"layer 0 \(batchnorm1d\): tensors\[0\]\['running_var'\] .* expected \(2,\)"),
    # Biases of 3 and 1 values for 2 outputs: they shifted the next layer's weights.
    ((2,), [FC, {"type": "relu"}, FC], [{**FC_VALUES, "bias": torch.tensor([10.0, 20, 30])}, {}, FC_VALUES],
     ValueError, r"layer 0 \(linear\): tensors\[0\]\['bias'\] has shape \(3,\), expected \(2,\)"),
    ((2,), [FC, {"type": "relu"}, FC], [FC_VALUES, {}, {**FC_VALUES, "bias": torch.tensor([40.0])}],
     ValueError, r"layer 2 \(linear\): tensors\[2\]\['bias'\] has shape \(1,\)"),
    # Three specs, one tensor dict: zip dropped the last two layers.
    ((2,), [FC, {"type": "relu"}, FC], [FC_VALUES], ValueError, "got 3 specs and 1 tensor dicts"),
    ((2,), [FC], [FC_VALUES, {}], ValueError, "got 1 specs and 2 tensor dicts"),
    # Weights instead of grid integers: truncated to [[0, 0], [1, 0]].
    ((2,), [FC], [{**FC_VALUES, "q": torch.tensor([[0.9, -0.7], [1.6, 0.2]])}],
     TypeError, r"layer 0 \(linear\): tensors\[0\]\['q'\] must be of dtype .*int64, got torch.float32"),
    ((2,), [FC], [{**FC_VALUES, "q": [[1, 0], [0, 1]]}], TypeError,
     r"layer 0 \(linear\): tensors\[0\]\['q'\] must be a torch.Tensor"),
    ((2,), [FC], [{**FC_VALUES, "in_mask": torch.tensor([0.5, 1.0])}], TypeError,
     r"layer 0 \(linear\): tensors\[0\]\['in_mask'\] must be of dtype torch.bool"),
    ((1, 3, 3), [CONV], [{"q": torch.zeros(1, 1, 3, 3, dtype=torch.int64), "in_mask": torch.ones(1, dtype=torch.bool)}],
     ValueError, r"layer 0 \(conv2d\): tensors\[0\]\['q'\] has shape \(1, 1, 3, 3\), expected \(1, 1, 2, 2\)"),
    # A bias missing (it raised KeyError) or one the spec has no room for (it was dropped).
    ((2,), [FC], [{k: v for k, v in FC_VALUES.items() if k != "bias"}], ValueError,
     r"layer 0 \(linear\): tensors\[0\] has keys \['in_mask', 'q'\], expected \['bias', 'in_mask', 'q'\]"),
    ((2,), [{**FC, "bias": False}], [FC_VALUES], ValueError, r"layer 0 \(linear\): tensors\[0\] has keys"),
    ((2,), [{"type": "relu"}], [{"weight": torch.ones(2)}], ValueError, r"layer 0 \(relu\): tensors\[0\] has keys"),
    ((2,), [{"type": "relu"}], [None], TypeError, r"layer 0 \(relu\): tensors\[0\] must be a dict"),
    # An input shape of 2.9 was stored as 2.
    ((2.9,), [FC], [FC_VALUES], TypeError, r"input_shape must be a sequence of ints, got \(2.9,\)"),
    ((True, 2), [FC], [FC_VALUES], TypeError, "input_shape must be a sequence of ints"),
    (2, [FC], [FC_VALUES], TypeError, "input_shape must be a sequence of ints"),
    # Specs the loader would reject, named by their index in specs before their tensors are read.
    ((2,), [{k: v for k, v in FC.items() if k != "bits"}], [FC_VALUES], ValueError, r"specs\[0\] .*has keys"),
    ((2,), [FC, {"type": "pickle"}], [FC_VALUES, {}], ValueError, r"specs\[1\] .*no known type"),
    ((2,), [["linear"]], [FC_VALUES], TypeError, r"specs\[0\] must be a dict"),
])
def test_write_refuses_tensors_that_do_not_match_the_specs(tmp_path, input_shape, specs, tensors, error, match):
    """Each of these was written without complaint into a file that loads as another network, or
    failed with an error naming neither argument nor layer (KeyError, AttributeError); now the
    argument and layer are named and nothing is written."""
    path = tmp_path / "model.bcz"
    path.write_bytes(b"previous contents")
    with pytest.raises(error, match=match):
        write_compressed(path, input_shape, specs, tensors)
    assert path.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bcz"]


def test_biases_float16_cannot_hold_are_refused(tmp_path):
    """The file stores biases as float16: 65504 is its largest value and 65519 rounds down to it, but
    65520 (halfway to 2^16) and beyond round to infinity, which was stored silently."""
    spec = {"type": "linear", "in": 1, "out": 2, "bias": True, "bits": 0}
    values = {"q": torch.tensor([[1], [1]]), "in_mask": torch.ones(1, dtype=torch.bool)}
    write_compressed(tmp_path / "edge.bcz", (1,), [spec], [{**values, "bias": torch.tensor([65504.0, -65519.0])}])
    assert load_compressed(tmp_path / "edge.bcz")[0].bias.tolist() == [65504.0, -65504.0]
    for bad in (65520.0, -70000.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"layer 0 \(linear\): tensors\[0\]\['bias'\] holds .*float16"):
            write_compressed(tmp_path / "bad.bcz", (1,), [spec], [{**values, "bias": torch.tensor([1.0, bad])}])
    # Through compress: the Bayesian layer's bias of 70000 would have loaded as inf.
    net = nn.Sequential(bclib.LinearGroupNJ(2, 2), nn.ReLU(), bclib.LinearGroupNJ(2, 2)).eval()
    with torch.no_grad():
        net[0].bias_mu.copy_(torch.tensor([70000.0, 1.0]))
    with pytest.raises(ValueError, match=r"layer 0 \(linear\): tensors\[0\]\['bias'\] holds 70000"):
        compress(net, 100.0).save(tmp_path / "big_bias.bcz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge.bcz"]


def test_write_is_atomic(tmp_path, monkeypatch):
    result = compress(tiny_net(), 0.0)
    path = tmp_path / "model.bcz"
    path.write_bytes(b"previous contents")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        result.save(path)
    assert path.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bcz"]
