"""The GEMM kernels on every ISA level this CPU can run, against the PyTorch reference."""

import os

import pytest
import torch

from ironlm import _kernels
from ironlm.quant import QuantLinear, bf16_rounds_activations
from ironlm.quant.formats import FORMATS, dequantize, kernel_activations, reference_linear
from isa_support import RUNNABLE



def check(layer: QuantLinear, x: torch.Tensor, bias=None):
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], layer.out_features)
    plain = layer.plain()
    # Tight: the reference fed the activations exactly as the kernel rounds them.
    exact_x = kernel_activations(x, layer.fmt, bf16_rounds_activations(x.shape[0]))
    ref = reference_linear(exact_x, plain, bias)
    tol = 1e-2 if x.dtype == torch.bfloat16 else 2e-5  # bf16 output rounding
    scale = ref.abs().max().item() + 1e-6
    assert (y.float() - ref).abs().max().item() <= tol * scale, "kernel differs from reference on the same activations"
    # Loose: against float activations, the error of activation rounding alone.
    loose = reference_linear(x, plain, bias)
    rel = ((y.float() - loose).norm() / loose.norm()).item()
    assert rel < 2e-2


SHAPES = [  # (M, N, K): N not a multiple of 16 or 32, K not a multiple of 32
    (1, 16, 32),
    (1, 40, 64),
    (2, 33, 70),
    (3, 100, 256),
    (5, 17, 31),
    (8, 64, 96),
    (13, 48, 160),
    (32, 31, 128),
    (64, 50, 200),
    (71, 20, 64),  # row-block boundary (64) and every remainder of 8-row micro-tiles
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_reference(isa, fmt, shape):
    m, n, k = shape
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if m % 2 else None
    layer = QuantLinear.from_dense(w, bias, fmt)
    x = torch.randn(m, k, generator=g)
    check(layer, x, bias)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_bf16_activations_and_strided_rows(isa, fmt):
    g = torch.Generator().manual_seed(7)
    n, k = 45, 96
    layer = QuantLinear.from_dense(torch.randn(n, k, generator=g), None, fmt)
    big = torch.randn(6, k + 20, generator=g)
    x = big[:, 5 : 5 + k]  # rows with a stride wider than K
    assert x.stride(0) == k + 20
    check(layer, x)
    check(layer, x.bfloat16())


def test_large_values_and_zero_blocks(isa):
    # All-zero activation blocks (scale 0) and weights spanning a wide range.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 96, generator=g) * torch.logspace(-3, 3, 96)
    x = torch.randn(4, 96, generator=g)
    x[:, 32:64] = 0
    for fmt in FORMATS:
        check(QuantLinear.from_dense(w, None, fmt), x)


def test_levels_agree_on_integer_formats():
    # Integer dot products are exact, so the levels differ only by float summation order.
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(70, 300, generator=g), torch.randn(9, 300, generator=g)
    before = _kernels.active_isa()[0]
    try:
        for fmt in ("int8", "int4", "int4_sym"):
            layer = QuantLinear.from_dense(w, None, fmt)
            outs = []
            for level in RUNNABLE:
                _kernels.set_isa(level)
                outs.append(layer(x))
            for out in outs[1:]:
                torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-4)
    finally:
        _kernels.set_isa(before)


PREFETCH_CODE = """
import hashlib, torch
from ironlm import _kernels
from ironlm.quant import QuantLinear
torch.manual_seed(0)
out = []
for fmt in ("int8", "int4_sym", "int4", "bf16"):  # decode rows, through the prefetching micro-tiles
    layer = QuantLinear.from_dense(torch.randn(100, 300), None, fmt)
    out += [layer(torch.randn(rows, 300)).flatten() for rows in (1, 2, 3)]
print(_kernels.prefetch_into_l2(), hashlib.sha256(torch.cat(out).numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("setting", ["l1", "l2", "bogus"])
def test_prefetch_setting(setting):
    """IRONLM_PREFETCH=l1|l2 picks where the decode kernels prefetch (otherwise L2 on AMD CPUs only, with a
    warning for a value it does not know); the results are the same either way."""
    import subprocess
    import sys

    results = {}
    for name in (setting, "l1"):
        run = subprocess.run([sys.executable, "-c", PREFETCH_CODE], env=dict(os.environ, IRONLM_PREFETCH=name),
                             capture_output=True, text=True, check=True)
        results[name] = run.stdout.split()
        if name == "bogus":
            assert "IRONLM_PREFETCH=bogus is not l1 or l2" in run.stderr
    amd = "AuthenticAMD" in open("/proc/cpuinfo").read()
    assert results[setting][0] == str({"l1": False, "l2": True, "bogus": amd}[setting])
    assert results["l1"][0] == "False"
    assert results[setting][1] == results["l1"][1]  # the same outputs, bit for bit


@pytest.mark.skipif("avx512_bf16" not in RUNNABLE, reason="needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("mode", ["on", "off"])
def test_bf16_dot_modes_on_the_bf16_level(mode):
    """Where AVX512-BF16 runs, bf16 weights go through vdpbf16ps (activations rounded to bf16) or are widened to
    fp32 for FMA, by the CPU's measured rates; each way matches its reference, and the kernel name says which."""
    g = torch.Generator().manual_seed(13)
    layer = QuantLinear.from_dense(torch.randn(50, 200, generator=g), torch.randn(50, generator=g), "bf16")
    x = torch.randn(37, 200, generator=g)
    before = _kernels.active_isa()[0]
    try:
        _kernels.set_isa("avx512_bf16")
        _kernels.set_bf16_dot(mode)
        assert _kernels.bf16_dot()[0] == bf16_rounds_activations(37) == (mode == "on")
        assert ("vdpbf16ps" if mode == "on" else "fp32 fma") in layer.kernel
        check(layer, x, layer.bias)
        check(layer, x[:1], layer.bias)
        _kernels.set_bf16_dot("auto")
        in_use, ratio = _kernels.bf16_dot()
        assert ratio > 0 and in_use == (ratio >= 0.75) and f"measured at {ratio:.2f}x" in layer.kernel
        check(layer, x, layer.bias)
    finally:
        _kernels.set_bf16_dot("auto")
        _kernels.set_isa(before)


def test_set_bf16_dot_rejects_unknown_mode():
    with pytest.raises(ValueError, match="auto, on or off"):
        _kernels.set_bf16_dot("fast")


def test_set_isa_rejects_unknown_level():
    with pytest.raises(ValueError):
        _kernels.set_isa("sse9")


def test_threads_do_not_change_results():
    g = torch.Generator().manual_seed(5)
    layer = QuantLinear.from_dense(torch.randn(200, 128, generator=g), None, "int4")
    x = torch.randn(3, 128, generator=g)
    before = _kernels.num_threads()
    try:
        _kernels.set_num_threads(1)
        one = layer(x)
        _kernels.set_num_threads(3)
        assert _kernels.num_threads() == 3
        three = layer(x)
    finally:
        _kernels.set_num_threads(before)
    assert torch.equal(one, three)
    assert torch.allclose(one, reference_linear(x, layer.plain()), rtol=0, atol=0.05 * one.abs().max().item())
    assert dequantize(layer.plain()).shape == (200, 128)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_row_count_up_to_64(isa, fmt):
    g = torch.Generator().manual_seed(9)
    layer = QuantLinear.from_dense(torch.randn(40, 72, generator=g), None, fmt)
    x = torch.randn(64, 72, generator=g)
    full = layer(x)
    for m in range(1, 65):
        # Each row's result does not depend on how many rows come with it.
        torch.testing.assert_close(layer(x[:m]), full[:m], rtol=0, atol=0)
    check(layer, x)


def test_kernels_work_in_a_forked_child():
    # A forked child has none of its parent's pool threads; the kernels must neither hang nor crash.
    layer = QuantLinear.from_dense(torch.randn(256, 128), None, "int8")
    x = torch.randn(4, 128)
    expected = layer(x)
    pid = os.fork()
    if pid == 0:  # child
        import signal

        signal.alarm(20)  # a hang ends the child, and the test fails below
        ok = torch.equal(layer(x), expected)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
