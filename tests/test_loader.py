"""The safetensors loader: layouts, dtypes, tied heads, clear errors, no pickles, and peak memory.

Every checkpoint here is written for the test with `safetensors.torch.save_file`, its tensor
names and full shapes taken from `LoopCoderForCausalLM(config).weight_specs()`.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from loopcoder.config import LoopCoderConfig
from loopcoder.loader import CheckpointError, SafetensorsFile, checkpoint_files, load_model
from loopcoder.model.attention import DenseAttention
from loopcoder.model.loopcoder import LoopCoderForCausalLM

TINY: dict[str, Any] = {
    "architectures": ["IQuestLoopCoderForCausalLM"],
    "model_type": "iquestloopcoder",
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "loop_num": 2,
    "loop_window_size": 5,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "eos_token_id": 2,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """The tiny test config with some fields replaced (a value of None removes the field)."""
    raw = {**TINY, **overrides}
    return {k: v for k, v in raw.items() if v is not None}


def checkpoint_shapes(raw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Full checkpoint shape of every tensor the model built from `raw` loads (names shared under TP appear once)."""
    # A real (uninitialised, bf16) model: the meta device would cost seconds of one-time imports for its RoPE setup.
    model = LoopCoderForCausalLM(LoopCoderConfig.from_dict(raw), torch.bfloat16)
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in model.weight_specs():
        shapes.setdefault(spec.name, tuple(spec.shape))
    return shapes


def random_tensors(raw: dict[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random HF-named tensors for `raw`: norms near 1, random gate weights and biases, linears ~ 1/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(raw).items():
        t = torch.randn(shape, generator=gen)
        if name.endswith("norm.weight"):
            t = 1 + 0.2 * t
        elif ".gate_projections." in name:
            t = t if name.endswith(".bias") else 0.3 * t
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = 0.5 * t
        else:
            t = t / math.sqrt(shape[1])
        out[name] = t.to(dtype).contiguous()
    return out


def write_checkpoint(
    path: Path,
    raw: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shards: int = 1,
    tensors: dict[str, torch.Tensor] | None = None,
    generation: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Write config.json and random (or the given) tensors as one file or `shards` files with an index; returns the tensors."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(raw, dtype, seed) if tensors is None else tensors
    (path / "config.json").write_text(json.dumps(raw))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return tensors
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return tensors


def loaded_tensor(model: LoopCoderForCausalLM, name: str) -> torch.Tensor:
    """The full checkpoint tensor `name` as the model holds it (reassembled from fused parameters)."""
    for spec in model.weight_specs():
        if spec.name == name:
            return spec.param[spec.rows]
    raise KeyError(name)


def assert_holds(model: LoopCoderForCausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every parameter holds exactly the checkpoint tensor cast to `dtype`."""
    assert {s.name for s in model.weight_specs()} <= set(tensors)
    for spec in model.weight_specs():
        got = spec.param[spec.rows]
        assert got.dtype == dtype, spec.name
        assert torch.equal(got, tensors[spec.name].to(dtype)), spec.name


IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])


# -- layouts ------------------------------------------------------------------------------------


def test_single_file_loads_every_tensor_exactly(tmp_path: Path) -> None:
    """One model.safetensors fills every (fused) parameter with exactly its tensor."""
    tensors = write_checkpoint(tmp_path, TINY)
    model = load_model(tmp_path, dtype="float32")
    assert_holds(model, tensors, torch.float32)
    # Fused projections are in HF order: q, k, v rows and gate, up rows.
    attn = tensors["model.layers.1.self_attn.q_proj.weight"], tensors["model.layers.1.self_attn.k_proj.weight"]
    qkv = model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv[:64], attn[0]) and torch.equal(qkv[64:96], attn[1])
    assert torch.equal(model.gate_projections[0].bias, tensors["model.gate_projections.0.bias"])
    assert not model.training


def test_sharded_with_index_equals_single_file(tmp_path: Path) -> None:
    """Three shards with model.safetensors.index.json load the same weights: identical logits."""
    tensors = write_checkpoint(tmp_path / "single", TINY, seed=1)
    write_checkpoint(tmp_path / "sharded", TINY, tensors=tensors, shards=3)
    assert len(list((tmp_path / "sharded").glob("model-*-of-00003.safetensors"))) == 3
    files = checkpoint_files(tmp_path / "sharded")
    assert {f.path.name for f in files.values()} == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    single = load_model(tmp_path / "single", dtype="float32")
    sharded = load_model(tmp_path / "sharded", dtype="float32")
    assert_holds(sharded, tensors, torch.float32)
    with torch.no_grad():
        assert torch.equal(single.forward_dense(IDS), sharded.forward_dense(IDS))


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("load_dtype", ["float32", "bfloat16"])
def test_file_dtype_converts_to_load_dtype(tmp_path: Path, file_dtype: torch.dtype, load_dtype: str) -> None:
    """bf16, fp16 and fp32 files each load as float32 and as bfloat16 (the tensor cast, exactly)."""
    tensors = write_checkpoint(tmp_path, tiny_config(torch_dtype=DTYPE_NAMES[file_dtype]), dtype=file_dtype)
    model = load_model(tmp_path, dtype=load_dtype)
    want = getattr(torch, load_dtype)
    assert model.dtype == want
    assert_holds(model, tensors, want)
    with torch.no_grad():
        logits = model.forward_dense(IDS)
    assert logits.dtype == torch.float32 and logits.shape == (1, IDS.shape[1], 97)
    assert torch.isfinite(logits).all()


AUTO_CASES = [("torch_dtype", "bfloat16"), ("torch_dtype", "float32"), ("dtype", "bfloat16"), ("dtype", "float16")]


@pytest.mark.parametrize(("key", "name"), AUTO_CASES)
def test_auto_dtype_follows_config(tmp_path: Path, key: str, name: str) -> None:
    """dtype="auto" (the default) loads in the config's torch_dtype (or transformers' newer `dtype` key)."""
    raw = {**tiny_config(torch_dtype=None), key: name}
    write_checkpoint(tmp_path, raw, dtype=torch.float32)
    model = load_model(tmp_path)
    assert model.dtype == getattr(torch, name)
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == getattr(torch, name)
    assert model.lm_head.weight.dtype == getattr(torch, name)


def test_unknown_load_dtype_is_named(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY)
    with pytest.raises(ValueError, match="dtype 'float8' is not one of"):
        load_model(tmp_path, dtype="float8")


def test_tied_head_without_lm_head_weight(tmp_path: Path) -> None:
    """tie_word_embeddings: no lm_head.weight in the file; the head is the embedding matrix."""
    raw = tiny_config(tie_word_embeddings=True)
    tensors = write_checkpoint(tmp_path, raw)
    assert "lm_head.weight" not in tensors
    model = load_model(tmp_path, dtype="float32")
    assert model.lm_head is model.embed_tokens
    assert_holds(model, tensors, torch.float32)
    with torch.no_grad():
        hidden = model.run_loops(IDS, torch.arange(IDS.shape[1]), DenseAttention(IDS.shape[1], 5, torch.device("cpu")))
        want = model.norm(hidden) @ tensors["model.embed_tokens.weight"].T
        assert torch.allclose(model.compute_logits(hidden), want, atol=1e-5)


def test_tied_head_ignores_a_saved_lm_head_copy(tmp_path: Path) -> None:
    """Some tied checkpoints also store lm_head.weight: it is accepted and the embedding is used."""
    raw = tiny_config(tie_word_embeddings=True)
    tensors = random_tensors(raw)
    tensors["lm_head.weight"] = torch.zeros(97, 64)
    write_checkpoint(tmp_path, raw, tensors=tensors)
    model = load_model(tmp_path, dtype="float32")
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_derived_rotary_inv_freq_is_ignored(tmp_path: Path) -> None:
    """Old checkpoints carry rotary_emb.inv_freq buffers: not an unexpected tensor."""
    tensors = random_tensors(TINY)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    write_checkpoint(tmp_path, TINY, tensors=tensors)
    load_model(tmp_path, dtype="float32")


def test_loop_num_1_ignores_gate_tensors(tmp_path: Path) -> None:
    """A loop_num 1 config over a checkpoint that has gates loads (the gates are unused)."""
    write_checkpoint(tmp_path, TINY)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(loop_num=1)))
    model = load_model(tmp_path, dtype="float32")
    assert model.config.loop_num == 1


def test_read_slices_rows_and_columns(tmp_path: Path) -> None:
    """SafetensorsFile.read gives a tensor, its row slice and its column slice (tensor-parallel reads)."""
    t = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10)
    save_file({"t": t}, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.tensors["t"].shape == (6, 10)
    assert torch.equal(f.read("t"), t)
    assert torch.equal(f.read("t", 0, 2, 5), t[2:5])
    assert torch.equal(f.read("t", 1, 4, 9), t[:, 4:9])


def test_read_scalar_tensor(tmp_path: Path) -> None:
    """A 0-d tensor (which some checkpoints carry as metadata-like values) reads back as a scalar."""
    save_file({"s": torch.tensor(7.5, dtype=torch.bfloat16)}, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.tensors["s"].shape == ()
    got = f.read("s")
    assert got.shape == () and got.dtype == torch.bfloat16 and got.item() == 7.5


# -- errors -------------------------------------------------------------------------------------


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    tensors = random_tensors(TINY)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    write_checkpoint(tmp_path, TINY, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"is missing tensor model\.layers\.1\.mlp\.down_proj\.weight$"):
        load_model(tmp_path, dtype="float32")


def test_several_missing_tensors_are_counted(tmp_path: Path) -> None:
    """Untied config over a tied checkpoint: lm_head.weight missing; plus both of layer 0's gate tensors."""
    tensors = random_tensors(TINY)
    for name in ("lm_head.weight", "model.gate_projections.0.weight", "model.gate_projections.0.bias"):
        del tensors[name]
    write_checkpoint(tmp_path, TINY, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"is missing tensor lm_head\.weight \(and 2 more\)"):
        load_model(tmp_path, dtype="float32")


def test_missing_gates_are_named(tmp_path: Path) -> None:
    """The trap of one serving engine: gate tensors live at model level, and a loop_num 2 model needs them."""
    tensors = {n: t for n, t in random_tensors(TINY).items() if ".gate_projections." not in n}
    write_checkpoint(tmp_path, TINY, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.gate_projections\.0\.bias \(and 3 more\)"):
        load_model(tmp_path, dtype="float32")


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    tensors = random_tensors(TINY)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    write_checkpoint(tmp_path, TINY, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"has unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias$"):
        load_model(tmp_path, dtype="float32")


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    tensors = random_tensors(TINY)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    write_checkpoint(tmp_path, TINY, tensors=tensors)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, dtype="float32")
    msg = str(err.value)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "model.safetensors" in msg
    assert "has shape [48, 64], expected [32, 64]" in msg


def test_non_float_tensor_is_refused(tmp_path: Path) -> None:
    tensors = random_tensors(TINY)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    write_checkpoint(tmp_path, TINY, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight in model\.safetensors has non-float dtype torch\.int32"):
        load_model(tmp_path, dtype="float32")


@pytest.mark.parametrize("cut", [1, 1000, "header"])
def test_truncated_file_is_named(tmp_path: Path, cut: int | str) -> None:
    """A file cut short (in the data, or inside its header) is refused with its path, before any read."""
    write_checkpoint(tmp_path, TINY)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    keep = 8 + header_len // 2 if cut == "header" else len(data) - int(cut)
    file.write_bytes(data[:keep])
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, dtype="float32")
    msg = str(err.value)
    assert str(file) in msg and "truncated" in msg
    if cut != "header":
        assert f"but the file has {keep}" in msg


def test_file_shorter_than_header_length(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: 3 bytes, too short for a safetensors header"):
        load_model(tmp_path, dtype="float32")


def test_garbage_file_is_corrupt(tmp_path: Path) -> None:
    """Random bytes: a nonsense header length is reported as truncated or corrupt, with the file."""
    write_checkpoint(tmp_path, TINY)
    garbage = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp_path / "model.safetensors").write_bytes(bytes(garbage.tolist()))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt: header of \d+ bytes in a 4096-byte file"):
        load_model(tmp_path, dtype="float32")


def test_header_that_is_not_json_is_corrupt(tmp_path: Path) -> None:
    """A plausible length followed by garbage bytes: the header is named as not valid JSON."""
    write_checkpoint(tmp_path, TINY)
    file = tmp_path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff\xfe garbage garbage garbage garb"
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its safetensors header is not valid JSON"):
        load_model(tmp_path, dtype="float32")


def test_header_entry_with_wrong_size_is_corrupt(tmp_path: Path) -> None:
    """Offsets that disagree with dtype x shape are caught from the header alone."""
    save_file({"a": torch.zeros(4, 4)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len].replace(b'"shape":[4,4]', b'"shape":[4,5]')
    (tmp_path / "x.safetensors").write_bytes(data[:8] + header + data[8 + header_len :])
    with pytest.raises(CheckpointError, match=r"is corrupt: tensor a has 64 bytes for shape \[4, 5\]"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard model-00002-of-00002\.safetensors, which is missing from"):
        load_model(tmp_path, dtype="float32")


def test_index_putting_a_tensor_in_the_wrong_shard(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, TINY, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = next(n for n, s in index["weight_map"].items() if s.startswith("model-00001"))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"puts tensor {name} in model-00002-of-00002\.safetensors, which does not hold it"):
        load_model(tmp_path, dtype="float32")


def test_no_model_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json in"):
        load_model(tmp_path, dtype="float32")


class _Trap:
    """Unpickling this runs `Path(marker).touch()`: proof a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_never_unpickles_pytorch_model_bin(tmp_path: Path) -> None:
    """A pytorch_model.bin alone (here a pickle that would touch a file) gives the no-safetensors error; nothing runs."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    marker = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json in"):
        load_model(tmp_path, dtype="float32")
    assert not marker.exists()
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())  # the trap works
    assert marker.exists()


def test_missing_config(tmp_path: Path) -> None:
    save_file(random_tensors(TINY), tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_model(tmp_path)


# -- peak memory --------------------------------------------------------------------------------

BIG = tiny_config(
    vocab_size=32000, hidden_size=1024, intermediate_size=1536, num_hidden_layers=12,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, torch_dtype="bfloat16",
)

MEASURE = textwrap.dedent(
    """
    import gc, json, resource, sys
    import torch
    from loopcoder.loader import load_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart this process's own peak (VmHWM) from here
    model = load_model(sys.argv[1], dtype=sys.argv[2])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({
        "before_kib": before,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vm_hwm_kib": status("VmHWM"),
        "param_bytes": params,
    }))
    """
)


def test_peak_memory_of_a_300mb_load(tmp_path: Path) -> None:
    """Loading a ~300 MB bf16 checkpoint as bfloat16 raises peak RSS by < 1.3x the parameter bytes.

    Measured in a fresh subprocess: peak RSS during the load minus the RSS just before it (after
    importing torch and loopcoder). `-s` prints the ratio. A child spawned by subprocess (vfork)
    inherits the parent's peak in `ru_maxrss`, so the peak used is the child's own VmHWM, restarted
    just before the load; ru_maxrss is printed too and agrees when the parent's peak is smaller.
    """
    path = tmp_path / "big"
    try:
        tensors = write_checkpoint(path, BIG, dtype=torch.bfloat16)
        file_bytes = (path / "model.safetensors").stat().st_size
        param_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        assert 280e6 < file_bytes < 340e6
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, str(path), "bfloat16"], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr
        m = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        for file in path.glob("*"):
            file.unlink()
    assert m["param_bytes"] == param_bytes
    increase = (m["vm_hwm_kib"] - m["before_kib"]) * 1024
    ratio = increase / param_bytes
    ru_ratio = (m["ru_maxrss_kib"] - m["before_kib"]) * 1024 / param_bytes
    print(
        f"\npeak memory: params {param_bytes / 2**20:.1f} MiB (bf16), RSS before {m['before_kib'] / 1024:.1f} MiB, "
        f"peak increase {increase / 2**20:.1f} MiB, ratio {ratio:.3f} (ru_maxrss-based {ru_ratio:.3f})"
    )
    assert 0.9 < ratio < 1.3

