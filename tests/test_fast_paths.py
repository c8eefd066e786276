"""The fast paths compute what the plain PyTorch path computes, within the dtype's tolerance.

Native CPU kernels (skinny GEMM with fused SwiGLU/residual, int8 weights, RMSNorm, RoPE, paged
decode attention with the gate fused in), the GEMM for many rows, and int8
weights against a dequantized reference. Speed is a benchmark figure (benchmarks/run.py), never
a test. bf16 tolerance: the fast path may differ from the plain path by no more than the plain
path differs from an fp32 run of the same weights (plus a small floor).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import PagedHarness
from loopcoder import kernels
from loopcoder.config import LoopCoderConfig
from loopcoder.model.attention import PagedAttention
from loopcoder.model.layers import Weight, linear, pack_weights, split_qkv_rope
from loopcoder.model.loopcoder import DecoderLayer, LoopCoderForCausalLM
from loopcoder.quantization import quantize_int8, quantize_model


@pytest.fixture(scope="module", autouse=True)
def ops():
    module = kernels.load()
    if module is None:
        pytest.skip("native CPU kernels unavailable on this machine")
    print(f"\nnative kernels built or loaded in {kernels.load_seconds():.1f} s")
    assert module.wide == kernels.wide_build()
    return module


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def near(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, fp32_ulp: float = 1e-5) -> bool:
    """Within one rounding of the output dtype at its largest value (fp32: `fp32_ulp`) of the float64 result."""
    ulp = fp32_ulp if dtype == torch.float32 else 2**-7
    return bool((got.double() - exact).abs().max() <= ulp * max(1.0, exact.abs().max().item()))


def plain_linear(*args, **kwargs) -> torch.Tensor:
    with kernels.plain():
        return linear(*args, **kwargs)


# -- ops ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not kernels.wide_build(), reason="this CPU builds the AVX2 kernels, which every other test here runs")
def test_avx2_build_passes_these_tests_too() -> None:
    """On a CPU with AVX512-BF16 the tests here run the AVX-512 build; the AVX2 build, which every other
    x86-64 CPU gets, must pass them as well (in a process of its own: a build is chosen once per process)."""
    env = {**os.environ, "LOOPCODER_KERNELS": "avx2"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_build"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 32])
@pytest.mark.parametrize("k", [96, 100])
def test_skinny_linear(ops, dtype: torch.dtype, rows: int, k: int) -> None:
    """Any row count up to 32, K with and without a tail of < 8, weight rows not a multiple of 4 or 16: the
    native op itself and `linear` (which may hand a plain weight to the GEMM from fewer rows on)."""
    x, w = rand(rows, k, dtype=dtype), rand(37, k, dtype=dtype, seed=1) / 8
    exact = x.double() @ w.double().T
    assert near(ops.linear(x, w), exact, dtype) and near(linear(x, w), exact, dtype) and near(plain_linear(x, w), exact, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("cols", [100, 96])
def test_packed_layout_round_trips(ops, dtype: torch.dtype, cols: int) -> None:
    """19 rows (two groups of 8 and a row-major tail of 3), 100 columns (padded to 112) or 96 (no padding: the
    whole-group copy)."""
    w = (rand(19, cols, seed=7) * 40).to(dtype)
    packed = ops.pack(w)
    assert packed.shape == (19, -(-cols // 16) * 16)
    assert torch.equal(ops.unpack(packed, cols), w)
    ids = torch.tensor([0, 7, 8, 15, 16, 18, 3])
    assert torch.equal(ops.packed_rows(packed, ids, cols), w[ids])


def test_pack_weights_streams_one_buffer_in_decode_order() -> None:
    """Packed matrices of a dtype follow one another in one buffer, in the order a decode step reads them,
    and each holds what packing it alone gives."""
    model = tiny_model(torch.bfloat16)
    before = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, Weight)}
    pack_weights(model)
    weights = [(name, m) for name, m in model.named_modules() if isinstance(m, Weight)]
    assert [name for name, _ in weights][:5] == [
        "embed_tokens", "layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj",
    ]
    start = weights[0][1].weight.data_ptr()
    for (_, a), (_, b) in zip(weights, weights[1:]):
        assert b.weight.data_ptr() == a.weight.data_ptr() + a.weight.numel() * a.weight.element_size()
    assert weights[-1][1].weight.untyped_storage().data_ptr() == start
    for name, m in weights:
        assert m.packed and torch.equal(m.weight, kernels.load().pack(before[name]))


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 32, 40, 300])
@pytest.mark.parametrize("quantized", [False, True])
def test_packed_linear(ops, rows: int, quantized: bool) -> None:
    """Packed bf16 or int8 weights (native kernel up to the threshold, unpacked GEMM above) against the plain path."""
    w, x, res = rand(19, 100, dtype=torch.bfloat16, seed=8) / 8, rand(rows, 100, dtype=torch.bfloat16, seed=9), rand(rows, 19, seed=10)
    scale = None
    if quantized:
        w, scale = quantize_int8(w)
    res = res.to(torch.bfloat16)
    got = linear(x, ops.pack(w), scale, residual=res, packed=True)
    exact = res.double() + x.double() @ (w.double() if scale is None else w.double() * scale.double()[:, None]).T
    assert near(got, exact, torch.bfloat16) and near(plain_linear(x, w, scale, residual=res), exact, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_and_residual(dtype: torch.dtype) -> None:
    x, w, res = rand(4, 2, 160, dtype=dtype), rand(24, 80, dtype=dtype, seed=1) / 8, rand(4, 2, 24, dtype=dtype, seed=2)
    fast = linear(x, w, residual=res, swiglu=True)
    plain = plain_linear(x, w, residual=res, swiglu=True)
    assert fast.shape == plain.shape == (4, 2, 24)
    assert torch.allclose(fast.float(), plain.float(), atol=1e-5 if dtype == torch.float32 else 3e-2)


def test_many_rows_as_exact_as_the_bf16_gemm() -> None:
    """Above the skinny threshold a bf16 weight runs as a GEMM (widened to fp32 on a CPU without bf16
    units): as exact as bf16's own GEMM or better."""
    x, w = rand(100, 64, dtype=torch.bfloat16), rand(48, 64, dtype=torch.bfloat16, seed=1) / 8
    exact = x.double() @ w.double().T
    assert (linear(x, w).double() - exact).abs().max() <= (F.linear(x, w).double() - exact).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_of_many_rows(ops, dtype: torch.dtype) -> None:
    """The native SiLU-and-product of a prompt's rows (21 columns: a tail of 5 past the 8-wide steps) against PyTorch's ops."""
    x = rand(50, 42, dtype=dtype, seed=15) * 4
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    ulp = 1e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(ops.swiglu(x).float(), expected.float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_mix_of_many_rows(ops, dtype: torch.dtype) -> None:
    """A prompt's later-loop mix in one native pass against LoopGate.mix's PyTorch ops, each op rounded alike: in
    bf16 equal but where the fp32 gate logit, summed in another order, rounds the gate one step apart."""
    gate = tiny_model(dtype, head_dim=20).gate_projections[0]  # 16 dimensions 8 at a time, 4 one by one
    q, glob, local = (rand(37, 4, 20, dtype=dtype, seed=33 + i) for i in range(3))
    got, expected = ops.gate_mix(q, glob, local, gate.weight, gate.bias), gate.mix(q, glob, local)
    ulp = 1e-6 if dtype == torch.float32 else 2**-7
    assert (got.float() - expected.float()).abs().max().item() <= 2 * ulp * (glob.abs() + local.abs()).max().item()
    if dtype == torch.bfloat16:
        assert (got == expected).float().mean().item() >= 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantization_matches_torch_and_dequantized_reference(dtype: torch.dtype) -> None:
    w = rand(70, 96, dtype=dtype, seed=3)
    w[5] = 0  # an all-zero row gets scale 1
    q, scale = quantize_int8(w)
    with kernels.plain():
        q_ref, scale_ref = quantize_int8(w)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale[5] == 1
    assert ((q.float() * scale[:, None] - w.float()).abs() <= scale[:, None] / 2 + 1e-6).all()
    dequantized = q.double() * scale.double()[:, None]
    for rows in (1, 7, 50):  # native kernel, and the widened GEMM above the threshold
        x = rand(rows, 96, dtype=dtype, seed=rows)
        exact = x.double() @ dequantized.T
        # The native int8 kernel takes activations in 15-bit fixed point: finer than bf16, coarser than fp32.
        assert near(linear(x, q, scale), exact, dtype, fp32_ulp=2**-13) and near(plain_linear(x, q, scale), exact, dtype)


@pytest.mark.skipif(not kernels.wide_build(), reason="the native prefill attention is built on AVX512-BF16 CPUs only")
@pytest.mark.parametrize(("tokens", "first", "heads", "kv_heads", "head_dim", "window", "key_first"), [
    (37, 0, 16, 4, 64, 0, 0), (70, 100, 8, 2, 128, 0, 0), (5, 3, 6, 3, 64, 0, 0),  # loop 0's causal attention
    (37, 0, 16, 4, 64, 5, 0), (70, 100, 8, 2, 128, 64, 37), (130, 9, 4, 2, 64, 64, 0),  # a later loop's window
    (3, 200, 4, 4, 64, 64, 137), (20, 200, 4, 4, 64, 64, 120),
    (29, 11, 10, 2, 64, 0, 0), (29, 11, 10, 2, 64, 8, 0),  # five query heads per KV head: tiles span tokens
])
def test_prefill_attention_matches_sdpa(ops, tokens: int, first: int, heads: int, kv_heads: int, head_dim: int, window: int,
                                        key_first: int) -> None:
    """New tokens at positions first.. over keys at positions key_first.. read through cache rows `slots` (scattered, as
    paged blocks are), causal and within `window` if given: within bf16 rounding of a float64 reference, as PyTorch's own
    bf16 attention is."""
    count = first + tokens - key_first
    q = rand(tokens, heads, head_dim, dtype=torch.bfloat16, seed=11)
    keys, values = (rand(count + 9, kv_heads, head_dim, dtype=torch.bfloat16, seed=seed) for seed in (12, 13))
    slots = torch.randperm(count + 9, generator=torch.Generator().manual_seed(14))[:count]
    q_pos, k_pos = first + torch.arange(tokens)[:, None], key_first + torch.arange(count)[None, :]
    mask = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)

    def reference(q, k, v):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(0, 1)

    exact = reference(q.double(), keys[slots].double(), values[slots].double())
    got = ops.prefill_attention(q, keys, values, slots, first, window, key_first)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert near(got, exact, torch.bfloat16) and near(reference(q, keys[slots], values[slots]), exact, torch.bfloat16)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_decode_attention_matches_float64(ops, head_dim: int) -> None:
    """One new token per sequence over scattered cache blocks, causal and within a window of 5, against float64
    softmax attention; bf16 head sizes that are multiples of 32 take the vdpbf16ps path on AVX-512 builds."""
    gen = torch.Generator().manual_seed(40)
    heads, kv_heads, block = 8, 2, 4
    positions = torch.tensor([0, 16, 98])
    table = torch.randperm(3 * 26, generator=gen).view(3, 26)
    keys, values = (torch.randn(3 * 26 * block, kv_heads, head_dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    q = (torch.randn(3, heads, head_dim, generator=gen) * 2).to(torch.bfloat16)
    for window in (0, 5):
        got = ops.decode_attention(q, torch.arange(3), positions, keys, values, table, block, window).double()
        for b, pos in enumerate(positions.tolist()):
            seen = range(max(pos - window + 1, 0) if window else 0, pos + 1)
            slots = torch.tensor([table[b, j // block].item() * block + j % block for j in seen])
            k, v = (t[slots].double().repeat_interleave(heads // kv_heads, 1) for t in (keys, values))
            weights = torch.softmax(torch.einsum("hd,jhd->hj", q[b].double(), k) / head_dim**0.5, -1)
            expected = torch.einsum("hj,jhd->hd", weights, v)
            assert (got[b] - expected).abs().max().item() < 2**-7 * max(1.0, expected.abs().max().item()), (window, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope(dtype: torch.dtype) -> None:
    from loopcoder.model.layers import RMSNorm, RotaryEmbedding

    norm = RMSNorm(64, 1e-5, dtype)
    norm.weight.data = rand(64, dtype=dtype, seed=4)
    x = rand(9, 64, dtype=dtype, seed=5)
    with kernels.plain():
        expected = norm(x)
    ulp = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert torch.allclose(norm(x).float(), expected.float(), rtol=ulp, atol=ulp)

    qkv = rand(9, (4 + 2 * 2) * 16, dtype=dtype, seed=6)
    cos, sin = RotaryEmbedding(16, 10000.0, None, 128).cos_sin(torch.arange(3, 12), dtype)
    fast = split_qkv_rope(qkv, 4, 2, cos, sin)
    with kernels.plain():
        plain = split_qkv_rope(qkv, 4, 2, cos, sin)
    for a, b in zip(fast, plain, strict=True):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=4 * ulp)


# -- whole model over the paged engine --------------------------------------------------------------


def tiny_model(dtype: torch.dtype, loop_num: int = 2, window: int = 5, seed: int = 0, head_dim: int = 16) -> LoopCoderForCausalLM:
    """Random weights with random gates (both branches matter), head_dim 16 (the decode attention kernel's
    case) unless given (64: the prefill attention kernel's too)."""
    config = LoopCoderConfig.from_dict({
        "model_type": "iquestloopcoder", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head_dim,
        "loop_num": loop_num, "loop_window_size": window, "torch_dtype": "float32",
    })
    model = LoopCoderForCausalLM(config, dtype)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        w = torch.randn(p.shape, generator=gen) * (0.3 if "norm" in name else 0.15) + (1.0 if "norm" in name else 0.0)
        p.data = w.to(dtype)
    return model.eval()


def run_engine(model: LoopCoderForCausalLM, prompt: list[int], chunk: int, decodes: int, plain: bool) -> torch.Tensor:
    """Logits of a chunked prefill and then one-token steps, the whole prompt fed back (teacher forcing)."""
    harness = PagedHarness(model, num_blocks=64, block_size=4)
    ids = prompt + [(7 * i + 3) % 101 for i in range(decodes)]
    seq = harness.new(ids)
    parts = []
    with kernels.plain() if plain else nullcontext():
        while seq.num_computed < len(ids):
            n = min(chunk if seq.num_computed < len(prompt) else 1, len(ids) - seq.num_computed)
            parts += harness.step([seq], [n])
    return torch.cat(parts)


PROMPT = [5, 17, 33, 2, 90, 41, 8, 64, 12, 77, 3, 50]


@pytest.mark.parametrize("loop_num", [2, 3])
def test_fp32_model_fast_equals_plain(loop_num: int) -> None:
    model = tiny_model(torch.float32, loop_num)
    fast = run_engine(model, PROMPT, 5, 12, plain=False)
    plain = run_engine(model, PROMPT, 5, 12, plain=True)
    assert (fast - plain).abs().max() < 1e-4
    with torch.no_grad():
        dense = model.forward_dense(torch.tensor([PROMPT + [(7 * i + 3) % 101 for i in range(12)]]))[0]
    assert (fast - dense).abs().max() < 1e-4


@pytest.mark.parametrize("head_dim", [16, 64])
def test_bf16_model_fast_within_bf16_tolerance(head_dim: int) -> None:
    reference = run_engine(tiny_model(torch.float32, head_dim=head_dim), PROMPT, 5, 12, plain=True)
    model = tiny_model(torch.bfloat16, head_dim=head_dim)
    fast = run_engine(model, PROMPT, 5, 12, plain=False)
    plain = run_engine(model, PROMPT, 5, 12, plain=True)
    bf16_error = (plain - reference).abs().max()
    assert (fast - plain).abs().max() <= 2 * bf16_error + 1e-2
    assert (fast - reference).abs().max() <= 2 * bf16_error + 1e-2


def test_batched_decode_rows_are_independent() -> None:
    """A decode batch of sequences at different lengths gives each the logits it gets alone (fp32)."""
    model = tiny_model(torch.float32)
    prompts = [PROMPT, PROMPT[:4], PROMPT[:9]]
    alone = [run_engine(model, p, 100, 6, plain=False)[-6:] for p in prompts]
    harness = PagedHarness(model, num_blocks=64, block_size=4)
    seqs = [harness.new(p + [(7 * i + 3) % 101 for i in range(6)]) for p in prompts]
    for seq, p in zip(seqs, prompts, strict=True):
        harness.step([seq], [len(p)])
    got = [[] for _ in seqs]
    for _ in range(6):
        for i, out in enumerate(harness.step(seqs, [1] * len(seqs))):
            got[i].append(out)
    for mine, ref in zip(got, alone, strict=True):
        assert (torch.cat(mine) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_decode_layer_equals_op_by_op(monkeypatch, quantized: bool) -> None:
    """A decode step's layers in one native call each give exactly what the ops give one Python call at a time."""
    model = tiny_model(torch.bfloat16)
    if quantized:
        quantize_model(model, "int8")
    calls = []
    fused_layer = DecoderLayer.native_decode
    monkeypatch.setattr(DecoderLayer, "native_decode", lambda *a: calls.append(1) or fused_layer(*a))
    fused = run_engine(model, PROMPT, 5, 8, plain=False)
    assert len(calls) == 5 * 2 * 2  # one-token steps (20 ids run as 5, 5, 5, then 1 at a time) x loops x layers
    monkeypatch.setattr(PagedAttention, "native_decode", lambda self, h: None)
    op_by_op = run_engine(model, PROMPT, 5, 8, plain=False)
    assert torch.equal(fused, op_by_op)


def test_int8_model_equals_its_dequantized_reference() -> None:
    """An int8 model computes what an fp32 model holding the dequantized weights computes: the plain path to
    fp32 rounding, the native kernel (15-bit fixed-point activations) to a small part of what int8 itself changes."""
    model = tiny_model(torch.float32, seed=1)
    reference = tiny_model(torch.float32, seed=1)
    unquantized = run_engine(reference, PROMPT, 5, 8, plain=True)
    quantize_model(model, "int8")
    quantized = {name: m for name, m in model.named_modules() if isinstance(getattr(m, "scale", None), torch.Tensor)}
    assert len(quantized) == 2 * 4 + 2  # qkv, o, gate_up, down per layer; embedding; head
    for name, module in reference.named_modules():
        if name in quantized:
            module.weight.data = quantized[name].weight.float() * quantized[name].scale[:, None]
    fast = run_engine(model, PROMPT, 5, 8, plain=False)
    plain = run_engine(model, PROMPT, 5, 8, plain=True)
    expected = run_engine(reference, PROMPT, 5, 8, plain=True)
    assert (plain - expected).abs().max() < 1e-4
    assert (fast - expected).abs().max() < 0.05 * (unquantized - expected).abs().max()
