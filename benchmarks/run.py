"""Every performance figure of loopcoder on this machine, in one process and one sitting.

    python benchmarks/run.py            # the full run
    python benchmarks/run.py --quick    # fewer repeats, shorter runs

Prints one JSON line per figure as it is measured, then a table. Each figure is compared with a
ceiling of the machine measured right beside it, repeat by repeat (memory read bandwidth for
batch-1 decode, bf16 and fp32 GEMM throughput for prefill and batched decode), and each speedup
is the median of ratios of runs taken back to back, so a machine whose load changes during the
run still gives honest ratios. Models: a random-weight LoopCoder shaped like a ~0.5B model
(written once to --workdir) and the demo model when it is installed (its int8 quality figures
use the held-out part of its training corpus).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import loopcoder  # noqa: F401, I001 - before torch: it sets how long OpenMP threads spin, as for the CLI and the server
import torch

from benchmarks import ceilings, quality
from benchmarks import engine_figures as ef
from benchmarks import kernels as kernel_figures
from benchmarks.shapes import HALF_B, decode_bytes_per_token, prefill_flops_per_token, weight_counts, write_random_checkpoint
from loopcoder import kernels
from loopcoder.config import LoopCoderConfig

ROWS: list[dict] = []


def emit(figure: str, value: float, unit: str, **extra) -> dict:
    row = {"figure": figure, "value": round(value, 4), "unit": unit, **extra}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return row


def median(values) -> float:
    return statistics.median(list(values))


def rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:30])}
    repo = Path(__file__).parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=repo).stdout.strip())
    return {
        "cpu": info.get("model name", platform.processor()), "cpu_family_model": f"{info.get('cpu family')}/{info.get('model')}",
        "cpu_mhz": info.get("cpu MHz"), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "uncommitted_changes": dirty,
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average": os.getloadavg()[0],
        "commit": commit, "native_kernels": kernels.load() is not None, "kernel_load_s": round(kernels.load_seconds() or 0.0, 2),
    }


def bandwidth() -> float:
    return ceilings.memory_read_gbps(gib=0.5, repeats=3)


def gemm(dtype: torch.dtype) -> float:
    return ceilings.gemm_gflops(dtype, repeats=2)


def ceilings_section(when: str) -> None:
    emit("ceiling_memory_read_gbps", ceilings.memory_read_gbps(), "GB/s", when=when)
    emit("ceiling_memory_copy_gbps", ceilings.memory_copy_gbps(), "GB/s", when=when, note="read + written bytes")
    emit("ceiling_gemm_bf16_gflops", ceilings.gemm_gflops(torch.bfloat16), "GFLOP/s", when=when)
    emit("ceiling_gemm_fp32_gflops", ceilings.gemm_gflops(torch.float32), "GFLOP/s", when=when)
    peak = ceilings.product_peak_gflops()
    if peak is not None:
        instruction = "vdpbf16ps" if kernels.load().wide else "fp32 FMA"
        emit("ceiling_product_peak_gflops", peak, "GFLOP/s", when=when, note=f"register-only loop of {instruction}")


def kernels_section(quick: bool) -> None:
    for row in kernel_figures.linear_rates([1, 8, 32, 64], layers=4 if quick else 8, repeats=3 if quick else 5):
        emit("linear_weight_gbps", row["weight_gbps"], "GB/s", kernel=row["kernel"], rows=row["rows"], gflops=round(row["gflops"], 2))
    for tokens in (512, 2048):
        att = kernel_figures.window_attention_seconds(tokens, 16, 4, 64, 64, repeats=2 if quick else 3)
        emit("window_attention_ms", 1e3 * att["band_s"], "ms", tokens=tokens, layout="band",
             speedup_vs_square=round(att["square_s"] / att["band_s"], 2), square_ms=round(1e3 * att["square_s"], 2))


def target(applies: bool, text: str, met: bool) -> dict:
    """The issue's target for this figure (they are set for the 0.5B shape only)."""
    return {"target": text, "met": met} if applies else {}


def load_section(name: str, path: Path, repeats: int, targets: bool) -> None:
    ef.read_seconds(path)  # warm the page cache: every figure below reads from memory, not disk
    reads, loads = [], []
    for _ in range(repeats):
        seconds, size = ef.read_seconds(path)
        reads.append(seconds)
        loads.append(ef.load_seconds(path))
    ratio = median(load / read for load, read in zip(loads, reads, strict=True))
    emit("checkpoint_read_s", median(reads), "s", model=name, bytes=size, runs=rounded(reads))
    emit("checkpoint_load_s", median(loads), "s", model=name, runs=rounded(loads), ratio_of_read=round(ratio, 2),
         **target(targets, "<= 2x read", ratio <= 2))
    emit("checkpoint_load_int8_s", ef.load_seconds(path, "int8"), "s", model=name, note="load, then quantize to int8")


def prefill_section(name: str, engine, config: LoopCoderConfig, lengths: list[int], quick: bool, targets: bool) -> dict:
    kv = {}
    for length in lengths:
        runs = []
        for rep in range(1 if quick else 3):
            runs.append((gemm(torch.bfloat16), gemm(torch.float32), *ef.prefill(engine, length, rep)))
        kv = runs[-1][3]
        flops = prefill_flops_per_token(config, length) / 1e9
        seconds = [r[2] for r in runs]
        rate = length / median(seconds)
        of_bf16 = median(length / s * flops / g for g, _, s, _ in runs)
        extra = target(targets and length == 2048, ">= 0.8 of bf16 GEMM", of_bf16 >= 0.8)
        emit("prefill_tokens_per_s", rate, "tok/s", model=name, prompt=length, gflops=round(rate * flops, 2),
             ratio_of_bf16_gemm=round(of_bf16, 3), ratio_of_fp32_gemm=round(median(length / s * flops / g for _, g, s, _ in runs), 3),
             runs=rounded([length / s for s in seconds]), **extra)
        emit("time_to_first_token_s", median(seconds), "s", model=name, prompt=length, runs=rounded(seconds))
    return kv


def decode_batch1_section(name: str, engines: dict, config: LoopCoderConfig, repeats: int, steps: int, targets: bool) -> None:
    """Batch-1 decode of each engine, back to back, each repeat beside a fresh bandwidth measurement."""
    rates: dict[str, list[float]] = {label: [] for label in engines}
    ceiling = []
    for engine, context in engines.values():  # warm up: first steps pay one-time costs
        with context():
            ef.decode_tokens_per_s(engine, 1, 2)
    for rep in range(repeats):
        ceiling.append(bandwidth())
        for label, (engine, context) in engines.items():
            with context():
                rates[label].append(ef.decode_tokens_per_s(engine, 1, steps, seed=rep))
    for label, runs in rates.items():
        weights = "int8" if label == "int8" else "bf16"
        per_token = decode_bytes_per_token(config, 1 if weights == "int8" else 2)
        extra = {"bytes_per_token": int(per_token),
                 "ratio_of_bandwidth_ceiling": round(median(r * per_token / 1e9 / c for r, c in zip(runs, ceiling, strict=True)), 3),
                 "bandwidth_runs": rounded(ceiling)}
        if label == "bf16":
            extra |= target(targets, ">= 0.75 of bandwidth", extra["ratio_of_bandwidth_ceiling"] >= 0.75)
        elif label == "int8":
            speedup = median(i / b for i, b in zip(runs, rates["bf16"], strict=True))
            extra |= {"speedup_vs_bf16": round(speedup, 2), **target(targets, ">= 1.6x bf16", speedup >= 1.6)}
        else:
            extra |= {"fast_path_speedup": round(median(b / p for b, p in zip(rates["bf16"], runs, strict=True)), 2)}
        figure = "decode_tokens_per_s" if label != "plain" else "decode_tokens_per_s_plain_path"
        emit(figure, median(runs), "tok/s", model=name, weights=weights, batch=1, runs=rounded(runs), **extra)


def decode_batch_section(
    name: str, engine, weights: str, config: LoopCoderConfig, batch: int, repeats: int, steps: int, targets: bool
) -> None:
    """Batched decode, each repeat beside a batch-1 run (for the ratio) and its compute ceilings: fp32 GEMM and the
    peak of the kernel's multiply-add."""
    runs, single, ceiling, peak = [], [], [], []
    bf16_products = weights == "bf16"  # int8 weights multiply in int16 (pmaddwd, vpdpwssd), not the instruction measured
    for rep in range(repeats):
        ceiling.append(gemm(torch.float32))
        if bf16_products:
            peak.append(ceilings.product_peak_gflops())
        single.append(ef.decode_tokens_per_s(engine, 1, steps, seed=rep))
        runs.append(ef.decode_tokens_per_s(engine, batch, steps, seed=rep))
    layers, head = weight_counts(config)
    gflop_per_token = 2 * (config.loop_num * layers + head) / 1e9
    ratio = median(b / s for b, s in zip(runs, single, strict=True))
    of_gemm = median(r * gflop_per_token / c for r, c in zip(runs, ceiling, strict=True))
    extra = {}
    if peak and None not in peak:
        extra["ratio_of_product_peak"] = round(median(r * gflop_per_token / p for r, p in zip(runs, peak, strict=True)), 3)
    extra |= target(targets and batch == 8 and weights == "bf16", ">= 5x batch 1", ratio >= 5)
    emit("decode_tokens_per_s", median(runs), "tok/s", model=name, weights=weights, batch=batch, runs=rounded(runs),
         ratio_to_batch_1=round(ratio, 2), ratio_of_fp32_gemm=round(of_gemm, 3), **extra)


def model_section(name: str, path: Path, quick: bool, prefill_lengths: list[int], targets: bool) -> None:
    """Load, prefill, TTFT, KV, memory and decode figures of one checkpoint: bf16, int8, and bf16 on the plain path
    (with `targets`, the issue's targets for the 0.5B shape, batched int8 decode too)."""
    config = LoopCoderConfig.from_pretrained(path)
    repeats = 3 if quick else 5
    load_section(name, path, 2 if quick else 3, targets)
    gc.collect()

    ef.reset_peak_rss()
    bf16, seconds = ef.start_engine(path, None)
    emit("engine_start_s", seconds, "s", model=name, weights="bf16", weight_bytes=ef.model_bytes(bf16), kv_cache_bytes=ef.cache_bytes(bf16))
    kv = prefill_section(name, bf16, config, prefill_lengths, quick, targets)
    emit("peak_rss_bytes", ef.peak_rss(), "B", model=name, weights="bf16", phase=f"engine start and prefills up to {max(prefill_lengths)}")
    emit("kv_bytes_per_token", kv["kv_bytes_per_token"], "B", model=name, every_loop=kv["kv_bytes_per_token"] * config.loop_num)
    emit("kv_bytes_per_sequence", kv["kv_bytes_per_sequence"], "B", model=name, tokens=kv["tokens"],
         window_state=kv["kv_local_bytes_per_sequence"], every_loop=kv["kv_bytes_every_loop"],
         ratio_of_every_loop=round(kv["kv_bytes_per_sequence"] / kv["kv_bytes_every_loop"], 3))

    before = ef.rss()
    int8, seconds = ef.start_engine(path, "int8")
    emit("engine_start_s", seconds, "s", model=name, weights="int8", weight_bytes=ef.model_bytes(int8), rss_added=ef.rss() - before)
    with kernels.plain():  # not packed for the native kernel either: the plain PyTorch path end to end
        plain, _ = ef.start_engine(path, None)
    engines = {"bf16": (bf16, nullcontext), "int8": (int8, nullcontext), "plain": (plain, kernels.plain)}
    decode_batch1_section(name, engines, config, repeats, 8 if quick else 16, targets)
    del engines, plain
    for batch in (8, 32):
        decode_batch_section(name, bf16, "bf16", config, batch, repeats, 8, targets)
        if targets:
            decode_batch_section(name, int8, "int8", config, batch, repeats, 8, targets)
    del bf16, int8
    gc.collect()


def quality_section(path: Path, quick: bool) -> None:
    engines = {label: ef.start_engine(path, q)[0] for label, q in (("bf16", None), ("int8", "int8"))}
    windows = quality.heldout_windows(path, 16 if quick else 64)
    preds = {label: quality.greedy_predictions(engine, windows) for label, engine in engines.items()}
    result = quality.compare(preds["bf16"], preds["int8"])
    emit("int8_greedy_agreement_pct", result["greedy_agreement_pct"], "%", model="demo", positions=result["positions"],
         target=">= 95%", met=result["greedy_agreement_pct"] >= 95)
    drop = result["reference_accuracy_pct"] - result["candidate_accuracy_pct"]
    emit("heldout_accuracy_pct", result["candidate_accuracy_pct"], "%", model="demo", weights="int8",
         bf16=round(result["reference_accuracy_pct"], 2), drop_points=round(drop, 2), target="within 1 point", met=abs(drop) <= 1)


RATIOS = ("ratio_of_bandwidth_ceiling", "ratio_of_bf16_gemm", "ratio_of_fp32_gemm", "ratio_of_product_peak", "ratio_of_read",
          "speedup_vs_bf16", "ratio_to_batch_1", "fast_path_speedup", "speedup_vs_square", "ratio_of_every_loop")


def table() -> str:
    lines = [f"{'figure':32} {'model':5} {'detail':36} {'value':>10} {'unit':7} ratios [target]"]
    for r in ROWS:
        detail = " ".join(f"{k}={r[k]}" for k in ("weights", "batch", "prompt", "rows", "kernel", "tokens", "when") if k in r)
        ratios = " ".join(f"{k}={r[k]}" for k in RATIOS if k in r)
        if "met" in r:
            ratios += f"  [{'MET' if r['met'] else 'NOT MET'}: {r['target']}]"
        lines.append(f"{r['figure']:32} {r.get('model', ''):5} {detail:36} {r['value']:>10.4g} {r['unit']:7} {ratios}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter runs")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's choice)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loopcoder-bench"), help="where the random 0.5B checkpoint is written")
    parser.add_argument("--skip-kernels", action="store_true", help="leave out the per-kernel figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    print(json.dumps({"figure": "machine", **machine()}), flush=True)
    ceilings_section("start")
    if not args.skip_kernels:
        kernels_section(args.quick)
    model_section("0.5b", write_random_checkpoint(args.workdir / "half-b", HALF_B), args.quick, [512, 2048], targets=True)
    from loopcoder.demo import DEMO_DIR

    if (DEMO_DIR / "config.json").is_file():
        longest = LoopCoderConfig.from_pretrained(DEMO_DIR).max_position_embeddings - 16
        model_section("demo", DEMO_DIR, args.quick, sorted({512, min(2048, longest)}), targets=False)
        quality_section(DEMO_DIR, args.quick)
    else:
        print(json.dumps({"figure": "demo", "note": f"no demo model in {DEMO_DIR}: its figures are left out"}), flush=True)
    ceilings_section("end")
    print(json.dumps({"figure": "run", "seconds": round(time.time() - started), "load_average_end": os.getloadavg()[0]}), flush=True)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
