"""Load Hugging Face LoopCoder checkpoints (one or sharded safetensors files).

The safetensors format is an 8-byte header length, a JSON header, then raw little-endian
tensor bytes. Reading it directly (no mmap, never a pickle) lets each tensor be read one at a
time straight into this rank's slice of its parameter, so peak memory stays near the model's
size and a truncated or corrupt file is named before anything is read from it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loopcoder.config import DTYPES, LoopCoderConfig
from loopcoder.model.layers import WeightSpec
from loopcoder.model.loopcoder import LoopCoderForCausalLM
from loopcoder.quantization import quantize_model

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
# Tensors some checkpoints carry that the model derives itself.
DERIVED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that does not hold the model its config describes."""


@dataclass
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """One .safetensors file: its header, validated against the file's size, and tensor reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{path} is truncated or corrupt: header of {header_len} bytes in a {size}-byte file")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
        self.data_start = 8 + header_len
        self.tensors: dict[str, TensorEntry] = {}
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
        for name, info in header.items():
            if name != "__metadata__":
                self.tensors[name] = self._entry(name, info, size)

    def _entry(self, name: str, info: dict, size: int) -> TensorEntry:
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path} is corrupt: bad header entry for tensor {name}: {info!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{self.path} is corrupt: tensor {name} has {end - begin} bytes for shape {list(shape)}")
        if self.data_start + end > size:
            raise CheckpointError(
                f"{self.path} is truncated: tensor {name} ends at byte {self.data_start + end} but the file has {size}"
            )
        return TensorEntry(dtype, shape, begin, end)

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, or its slice start:stop along `dim` (rows are read alone; columns via rows).

        With `out`, the result lands there; a row slice of the file's dtype is read straight into
        it, so loading needs no temporary copy of the tensor.
        """
        entry = self.tensors[name]
        shape = entry.shape or (1,)
        stop = shape[dim] if stop is None else stop
        first, last = (start, stop) if dim == 0 else (0, shape[0])
        rows = (last - first, *shape[1:])
        whole = dim == 0 or (start == 0 and stop == shape[dim])  # a column "slice" of every column is the whole tensor
        direct = out is not None and whole and out.dtype == entry.dtype and out.is_contiguous() and out.numel() == math.prod(rows)
        buffer = out.view(rows) if direct else torch.empty(rows, dtype=entry.dtype)
        row_bytes = math.prod(shape[1:]) * buffer.element_size()
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + entry.begin + first * row_bytes)
            view = memoryview(buffer.view(torch.uint8).numpy()).cast("B") if buffer.numel() else memoryview(b"")
            if f.readinto(view) != len(view):
                raise CheckpointError(f"{self.path} is truncated while reading tensor {name}")
        if direct:
            return out
        if not entry.shape:
            result = buffer.reshape(())
        else:
            result = buffer if dim == 0 else buffer.narrow(dim, start, stop - start)
        return result if out is None else out.copy_(result)


def checkpoint_files(path: Path) -> dict[str, SafetensorsFile]:
    """Map each tensor name to the file holding it (sharded via model.safetensors.index.json)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid index: {e}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard}, which is missing from {path}")
            files[shard] = SafetensorsFile(path / shard)
        for name, shard in weight_map.items():
            if name not in files[shard].tensors:
                raise CheckpointError(f"{index} puts tensor {name} in {shard}, which does not hold it")
        return {name: files[shard] for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    file = SafetensorsFile(single)
    return {name: file for name in file.tensors}


def resolve_dtype(dtype: str | torch.dtype, config: LoopCoderConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of ['auto', {', '.join(repr(d) for d in DTYPES)}]")
    return DTYPES[name]


def load_weights(
    model: LoopCoderForCausalLM, path: Path, progress: Callable[[int, int], None] | None = None
) -> None:
    """Fill every parameter from the checkpoint, one tensor at a time, checking names and shapes."""
    files = checkpoint_files(path)
    specs: dict[str, list[WeightSpec]] = {}
    for spec in model.weight_specs():
        specs.setdefault(spec.name, []).append(spec)
    missing = sorted(set(specs) - set(files))
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensor {missing[0]}" + _more(missing))
    ignorable = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if model.config.loop_num == 1:
        ignorable |= {n for n in files if n.startswith("model.gate_projections.")}
    unexpected = sorted(n for n in set(files) - set(specs) - ignorable if not DERIVED.search(n))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has unexpected tensor {unexpected[0]}" + _more(unexpected))
    for done, (name, group) in enumerate(specs.items(), 1):
        file = files[name]
        entry = file.tensors[name]
        if entry.shape != group[0].shape:
            raise CheckpointError(
                f"tensor {name} in {file.path.name} has shape {list(entry.shape)}, expected {list(group[0].shape)}"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} in {file.path.name} has non-float dtype {entry.dtype}")
        for spec in group:
            file.read(name, spec.dim, spec.start, spec.stop, out=spec.param.data[spec.rows])
        if progress:
            progress(done, len(specs))


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A checkpoint folder; None or "demo" names the demo model shipped with the package."""
    if model is None or str(model) == "demo":
        from loopcoder.demo import DEMO_DIR

        return DEMO_DIR
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (weights are never downloaded: give a local folder)")
    return path


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    progress: Callable[[int, int], None] | None = None,
    quantization: str | None = None,
) -> LoopCoderForCausalLM:
    """Build the model a checkpoint's config.json describes and load its weights (then quantize them, if asked)."""
    path = Path(path)
    config = LoopCoderConfig.from_pretrained(path)
    model = LoopCoderForCausalLM(config, resolve_dtype(dtype, config))
    load_weights(model, path, progress)
    quantize_model(model, quantization)
    return model.eval()
