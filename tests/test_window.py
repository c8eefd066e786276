"""The local window of the later loops: for query i, key i-W+1 is inside and key i-W is outside.

Loop 0 (and every later loop's global branch) sees all earlier tokens, so the boundary is pinned
where only the local branch can see it: on the attention backends with hand-made q/k/v, on a
random-weight model by perturbing only the last layer's local keys/values, and in the paged
engine by corrupting one local cache slot before a decode step. Then the golden checkpoints
are shown to catch (and tell apart) three published mistakes: a window of W+1, a gate computed
from the pre-RoPE query, and a no-op gate.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import loopcoder.model.loopcoder as loopcoder_module
from conftest import GOLDEN, PagedHarness, golden_cases
from loopcoder import kernels
from loopcoder.config import LoopCoderConfig
from loopcoder.loader import load_model
from loopcoder.model.attention import DenseAttention, PagedAttention
from loopcoder.model.loopcoder import LoopAttentionLayer, LoopCoderForCausalLM, LoopGate
from test_loader import tiny_config, write_checkpoint

CPU = torch.device("cpu")
H, KVH, HD = 4, 2, 8
TOL = 1e-3


def changed_rows(a: torch.Tensor, b: torch.Tensor, clear: bool = True) -> set[int]:
    """Rows (positions, dim 0) where a and b differ at all; with `clear`, each such row must differ by > 1e-3, not by rounding."""
    diff = (a - b).abs().flatten(1).amax(1)
    rows = {int(i) for i in torch.nonzero(diff).flatten()}
    assert not clear or all(diff[i] > 1e-3 for i in rows), diff
    return rows


def window_of(i: int, window: int) -> set[int]:
    """The keys the local branch of query i must see: i-W+1 .. i."""
    return set(range(max(i - window + 1, 0), i + 1))


def reach_to_windows(reach: dict[int, set[int]], seq_len: int) -> dict[int, set[int]]:
    """From 'perturbing key j changes queries reach[j]' to 'query i sees keys ...'."""
    return {i: {j for j, queries in reach.items() if i in queries} for i in range(seq_len)}


def hand_made(seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random q [T, H, D] and loop-0 / later-loop keys and values [T, KVH, D]."""
    gen = torch.Generator().manual_seed(seed)
    out = {"q": torch.randn(seq_len, H, HD, generator=gen)}
    for name in ("k0", "v0", "k", "v"):
        out[name] = torch.randn(seq_len, KVH, HD, generator=gen)
    return out


def perturbed(t: dict[str, torch.Tensor], names: tuple[str, ...], pos: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + pos)
    out = dict(t)
    for name in names:
        out[name] = t[name].clone()
        out[name][pos] += 3 * torch.randn(t[name].shape[1:], generator=gen)
    return out


def dense_branches(t: dict[str, torch.Tensor], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global, local) outputs [T, H, D] of a later loop on the dense backend."""
    seq_len = t["q"].shape[0]
    attn = DenseAttention(seq_len, window, CPU)
    attn.first_loop(0, t["q"][None], t["k0"][None], t["v0"][None])
    glob, loc = attn.later_loop(0, 1, t["q"][None], t["k"][None], t["v"][None])
    return glob[0], loc[0]


def shape_model(window: int) -> LoopCoderForCausalLM:
    """An uninitialised tiny model: the paged harness only needs its config and dtype."""
    return LoopCoderForCausalLM(LoopCoderConfig.from_dict(tiny_config(loop_window_size=window, head_dim=HD)))


def paged_branches(t: dict[str, torch.Tensor], window: int, chunk: int, block_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(global, local) outputs of a later loop on the paged backend, the sequence fed `chunk` tokens per step."""
    seq_len = t["q"].shape[0]
    harness = PagedHarness(shape_model(window), num_blocks=16, block_size=block_size)
    seq = harness.new(list(range(seq_len)))
    glob, loc = torch.empty_like(t["q"]), torch.empty_like(t["q"])
    while seq.num_computed < seq_len:
        n = min(chunk, seq_len - seq.num_computed)
        harness.blocks.allocate(seq, n)
        _, _, meta = harness.runner.prepare([seq], [n])
        attn = PagedAttention(harness.runner.cache, meta)
        rows = slice(seq.num_computed, seq.num_computed + n)
        attn.first_loop(0, t["q"][rows], t["k0"][rows], t["v0"][rows])
        glob[rows], loc[rows] = attn.later_loop(0, 1, t["q"][rows], t["k"][rows], t["v"][rows])
        seq.num_computed += n
        harness.blocks.after_step(seq)
    return glob, loc


# -- the attention backends -----------------------------------------------------------------------

SHAPES = [(5, 17), (4, 13), (1, 6), (64, 20)]


@pytest.mark.parametrize(("window", "seq_len"), SHAPES)
def test_dense_local_branch_sees_exactly_the_last_w_keys(window: int, seq_len: int) -> None:
    """Perturbing local key/value j changes local outputs j..j+W-1 only; the global branch never."""
    t = hand_made(seq_len)
    glob, loc = dense_branches(t, window)
    reach = {}
    for j in range(seq_len):
        g2, l2 = dense_branches(perturbed(t, ("k", "v"), j), window)
        assert changed_rows(g2, glob) == set()
        reach[j] = changed_rows(l2, loc)
        assert reach[j] == set(range(j, min(j + window, seq_len)))
    for i, seen in reach_to_windows(reach, seq_len).items():
        assert seen == window_of(i, window)
        if i >= window:
            assert i - window + 1 in seen and i - window not in seen


@pytest.mark.parametrize(("window", "seq_len"), SHAPES[:2])
def test_dense_global_branch_sees_every_earlier_loop0_key(window: int, seq_len: int) -> None:
    """Perturbing loop 0's key/value j changes global outputs j..T-1 and no local output."""
    t = hand_made(seq_len, seed=2)
    glob, loc = dense_branches(t, window)
    for j in range(seq_len):
        g2, l2 = dense_branches(perturbed(t, ("k0", "v0"), j), window)
        assert changed_rows(g2, glob) == set(range(j, seq_len))
        assert changed_rows(l2, loc) == set()


@pytest.mark.parametrize("only", ["k", "v"])
def test_dense_boundary_holds_for_keys_and_values_alone(only: str) -> None:
    """Query i: changing only the key (or only the value) at i-W+1 moves it; at i-W does not."""
    window, seq_len = 5, 12
    t = hand_made(seq_len, seed=3)
    _, loc = dense_branches(t, window)
    i = 9
    _, inside = dense_branches(perturbed(t, (only,), i - window + 1), window)
    _, outside = dense_branches(perturbed(t, (only,), i - window), window)
    assert i in changed_rows(inside, loc)
    assert torch.equal(outside[i], loc[i])


def boundary_keys(seq_len: int) -> list[int]:
    """Keys worth perturbing when not all of them are: keys 0 and 1 (queries W-1 / W, and W / W+1, sit on
    their window's edge), one in the middle, and the last."""
    return sorted({0, 1, seq_len // 2, seq_len - 1})


def kernel_path(native: bool) -> contextlib.AbstractContextManager:
    """The native CPU kernels where they load (decode steps), or the plain PyTorch path."""
    return contextlib.nullcontext() if native else kernels.plain()


@pytest.mark.parametrize(("window", "seq_len"), [(5, 9), (4, 8), (1, 4), (64, 6)])
@pytest.mark.parametrize(
    ("chunk", "native"), [(1, True), (1, False), (3, True), (10_000, True)], ids=["decode", "decode-plain", "chunk3", "whole"]
)
def test_paged_backend_has_the_same_window(window: int, seq_len: int, chunk: int, native: bool) -> None:
    """The paged backend (decodes, chunks of 3, whole prompt) gives the dense outputs and the same in/out pattern."""
    t = hand_made(seq_len, seed=4)
    glob, loc = dense_branches(t, window)
    with kernel_path(native):
        pglob, ploc = paged_branches(t, window, chunk)
    assert torch.allclose(pglob, glob, atol=1e-5) and torch.allclose(ploc, loc, atol=1e-5)
    for j in boundary_keys(seq_len):
        with kernel_path(native):
            g2, l2 = paged_branches(perturbed(t, ("k", "v"), j), window, chunk)
        assert changed_rows(g2, pglob) == set()
        assert changed_rows(l2, ploc) == set(range(j, min(j + window, seq_len)))


# -- a random-weight model --------------------------------------------------------------------------

MODELS = [(5, 3), (4, 2)]


@pytest.fixture(scope="module", params=MODELS, ids=[f"w{w}-loops{n}" for w, n in MODELS])
def random_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoopCoderForCausalLM:
    """Random weights, random gate weights and biases (both branches matter), 3 layers."""
    window, loops = request.param
    path: Path = tmp_path_factory.mktemp(f"w{window}-loops{loops}")
    write_checkpoint(path, tiny_config(loop_window_size=window, loop_num=loops, num_hidden_layers=3), seed=window * 10 + loops)
    return load_model(path, dtype="float32")


IDS = [11, 70, 3, 45, 45, 8, 91, 23, 60, 2, 37, 84, 15, 50, 29, 66, 7, 33]


class PerturbLastLocal(DenseAttention):
    """Dense attention that perturbs the local keys/values at `pos` in the last layer of the last loop only."""

    def __init__(self, model: LoopCoderForCausalLM, seq_len: int, pos: int) -> None:
        super().__init__(seq_len, model.config.loop_window_size, CPU)
        self.target = (model.config.num_hidden_layers - 1, model.config.loop_num - 1)
        self.pos = pos

    def later_loop(self, layer: int, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (layer, loop) == self.target:
            k, v = k.clone(), v.clone()
            k[:, self.pos] += 2.0
            v[:, self.pos] -= 2.0
        return super().later_loop(layer, loop, q, k, v)


def test_gates_are_mixed_in_the_random_model(random_model: LoopCoderForCausalLM) -> None:
    """The random gates give g well inside (0, 1), so both branches reach the logits."""
    model = random_model
    q = torch.randn(50, H, model.config.head_dim, generator=torch.Generator().manual_seed(0))
    g = model.gate_projections[0](q)
    assert 0.05 < g.mean() < 0.95 and g.min() < 0.3 and g.max() > 0.7


@torch.no_grad()
def test_model_logits_see_local_key_i_minus_w_plus_1_not_i_minus_w(random_model: LoopCoderForCausalLM) -> None:
    """Perturbing the last layer's local k/v at j changes the logits at exactly j..j+W-1."""
    model = random_model
    window = model.config.loop_window_size
    ids = torch.tensor([IDS])
    seq_len = ids.shape[1]
    positions = torch.arange(seq_len)
    clean = model.forward_dense(ids)[0]
    assert torch.equal(model.compute_logits(model.run_loops(ids, positions, DenseAttention(seq_len, window, CPU)))[0], clean)
    for j in boundary_keys(seq_len):
        logits = model.compute_logits(model.run_loops(ids, positions, PerturbLastLocal(model, seq_len, j)))[0]
        assert changed_rows(logits, clean) == set(range(j, min(j + window, seq_len)))


def decode_position(model: LoopCoderForCausalLM, ids: list[int], i: int, corruptions: list[tuple[str, int] | None]) -> list[torch.Tensor]:
    """Logits of position i decoded by the paged engine after a prefill of 0..i-1, once per corruption: each first
    overwrites the cached keys/values of one position in the local state (every later loop and layer) or the global one."""
    harness = PagedHarness(model, num_blocks=32, block_size=4)
    seq = harness.new(ids[: i + 1])
    harness.step([seq], [i])
    harness.blocks.allocate(seq, 1)
    cache = harness.runner.cache
    saved = cache.global_state.clone(), cache.local_state.clone()
    out = []
    for corrupt in corruptions:
        cache.global_state.copy_(saved[0])
        cache.local_state.copy_(saved[1])
        if corrupt is not None:
            kind, pos = corrupt
            block = (seq.local_blocks if kind == "local" else seq.global_blocks)[pos // 4]
            assert block is not None, "the engine has already released this local block"
            state = cache.local_state if kind == "local" else cache.global_state
            state[..., block * 4 + pos % 4, :, :] = 50.0
        out.append(harness.runner.run([seq], [1], torch.arange(1))[0])
    return out


@pytest.mark.parametrize("native", [True, False], ids=["native", "plain"])
def test_paged_decode_reads_local_key_i_minus_w_plus_1_not_i_minus_w(random_model: LoopCoderForCausalLM, native: bool) -> None:
    """In the engine, corrupting the local cache at i-W leaves the decode of i unchanged; at i-W+1 it does not.

    i-W is taken at offsets 0, 1, 2 of its block of 4 (at offset 3 the engine has already released the block).
    Both the native decode kernel (where it loads) and the plain PyTorch path.
    """
    model = random_model
    window = model.config.loop_window_size
    with torch.no_grad():
        dense = model.forward_dense(torch.tensor([IDS]))[0]
    for i in (window, window + 1, window + 2):
        with kernel_path(native):
            clean, outside, inside, global0 = decode_position(
                model, IDS, i, [None, ("local", i - window), ("local", i - window + 1), ("global", 0)]
            )
        assert torch.allclose(clean, dense[i], atol=1e-4)
        assert torch.equal(outside, clean)
        assert (inside - clean).abs().max() > 1e-2
        assert (global0 - clean).abs().max() > 1e-2


# -- golden parity catches the published mistakes ---------------------------------------------------

GOLDEN_WINDOWED = ["tiny-w5", "tiny-tied-w64"]


class WindowPlusOne(DenseAttention):
    """The mistake of one serving engine: W+1 keys in the local window."""

    def __init__(self, seq_len: int, window: int, device: torch.device) -> None:
        super().__init__(seq_len, window + 1, device)


class NoOpGate(DenseAttention):
    """The mistake of another port: g*A + (1-g)*A (the local branch is never used)."""

    def later_loop(self, layer: int, loop: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        glob, _ = super().later_loop(layer, loop, q, k, v)
        return glob, glob


def variant_logits(model: LoopCoderForCausalLM, ids: torch.Tensor, variant: str, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """forward_dense logits [T, vocab] with one mistake patched in (the source is not edited)."""
    with monkeypatch.context() as m, torch.no_grad():
        if variant == "window+1":
            m.setattr(loopcoder_module, "DenseAttention", WindowPlusOne)
        elif variant == "no-op gate":
            m.setattr(loopcoder_module, "DenseAttention", NoOpGate)
        elif variant == "pre-RoPE gate":
            qkv, gate, unroped = LoopAttentionLayer.qkv, LoopGate.forward, {}

            def qkv_keeping_unroped_q(self: LoopAttentionLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
                # RoPE with angle 0 (cos 1, sin 0) is the identity: this is the un-roped q.
                unroped["q"] = qkv(self, x, torch.ones_like(cos), torch.zeros_like(sin))[0]
                return qkv(self, x, cos, sin)

            def gate_from_unroped_q(self: LoopGate, q: torch.Tensor) -> torch.Tensor:
                return gate(self, unroped["q"])

            m.setattr(LoopAttentionLayer, "qkv", qkv_keeping_unroped_q)
            m.setattr(LoopGate, "forward", gate_from_unroped_q)
        else:
            assert variant == "real"
        return model.forward_dense(ids[None])[0]


@pytest.fixture(scope="module", params=GOLDEN_WINDOWED)
def golden_windowed(request: pytest.FixtureRequest) -> tuple[LoopCoderForCausalLM, list[tuple[torch.Tensor, torch.Tensor]]]:
    return load_model(GOLDEN / request.param, dtype="float32"), golden_cases(request.param)


def test_golden_parity_catches_and_tells_apart_three_mistakes(
    golden_windowed: tuple[LoopCoderForCausalLM, list[tuple[torch.Tensor, torch.Tensor]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real model: max err < 1e-3. Each mistake: max err > 1e-3, with its own signature in where it first differs:
    no-op gate from position 0, pre-RoPE gate from position 1 (RoPE at position 0 is the identity), window W+1
    from position W exactly (before it every window already holds all earlier keys)."""
    model, cases = golden_windowed
    window = model.config.loop_window_size
    first_diff = {"no-op gate": 0, "pre-RoPE gate": 1, "window+1": window}
    worst = dict.fromkeys(first_diff, 0.0)
    for ids, expected in cases:
        assert len(ids) > window + 1
        real = variant_logits(model, ids, "real", monkeypatch)
        assert (real - expected).abs().max().item() < TOL
        for variant, first in first_diff.items():
            got = variant_logits(model, ids, variant, monkeypatch)
            worst[variant] = max(worst[variant], (got - expected).abs().max().item())
            assert torch.equal(got[:first], real[:first]), variant
            rows = changed_rows(got, real, clear=False)
            assert min(rows) == first, variant
            if variant == "pre-RoPE gate":  # already visible inside the first window
                assert (got[1:window] - expected[1:window]).abs().max().item() > TOL
    for variant, err in worst.items():
        assert err > TOL, f"{variant}: max abs err {err:.2e} would pass golden parity"
