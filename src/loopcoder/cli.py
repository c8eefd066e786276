"""The `loopcoder` command: generate, bench (and the subcommands other modules add)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from loopcoder.sampling import SamplingParams


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="split the model over this many ranks")
    parser.add_argument("--quantization", default=None, choices=["int8"], help="quantize the weights at load (weight-only)")


def engine_args(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype, "device": args.device, "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size, "quantization": args.quantization,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from loopcoder import LLM

    llm = LLM(args.model, **engine_args(args))
    tokenizer = llm.get_tokenizer()
    if args.prompt_ids:
        prompt = {"prompt_token_ids": [int(t) for t in args.prompt_ids.split(",")]}
    elif args.prompt is None:
        print("error: give a PROMPT or --prompt-ids", file=sys.stderr)
        return 2
    elif args.fim_suffix is not None:
        prompt = tokenizer.fim_prompt(args.prompt, args.fim_suffix)
    else:
        prompt = args.prompt
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.seed, ignore_eos=args.ignore_eos,
    )
    out = llm.generate([prompt], params)[0].outputs[0]
    if tokenizer is None or args.ids:
        print(",".join(map(str, out.token_ids)))
    else:
        print((args.prompt if args.fim_suffix is None and not args.prompt_ids else "") + out.text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from loopcoder import LLM

    llm = LLM(args.model, **engine_args(args), max_num_seqs=max(args.num_prompts, 1))
    vocab = llm.engine.model.config.vocab_size
    prompts = [
        {"prompt_token_ids": [(7 * i + 13 * j) % (vocab - 1) + 1 for j in range(args.input_len)]}
        for i in range(args.num_prompts)
    ]
    llm.engine.config.enable_prefix_caching = False
    llm.engine.blocks.enable_prefix_caching = False
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
    total = time.perf_counter() - start
    decode_tokens = args.num_prompts * (args.output_len - 1)
    result = {
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "prefill_tokens_per_s": args.num_prompts * args.input_len / prefill,
        "decode_tokens_per_s": decode_tokens / max(total - prefill, 1e-9),
        "kv_pool": {k: v for k, v in llm.engine.pool_usage().items() if k != "per_request"},
    }
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopcoder", description="Run IQuest LoopCoder models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the result")
    gen.add_argument("prompt", nargs="?", help="prompt text (needs a checkpoint with a tokenizer)")
    add_model_args(gen)
    gen.add_argument("--prompt-ids", default=None, help="comma-separated prompt token ids")
    gen.add_argument("--fim-suffix", default=None, help="fill in the middle between PROMPT and this suffix")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--ids", action="store_true", help="print generated token ids instead of text")
    gen.set_defaults(func=cmd_generate)

    from loopcoder.server.commands import add_chat_command, add_serve_command

    add_chat_command(sub)
    add_serve_command(sub)

    bench = sub.add_parser("bench", help="offline throughput: prefill and decode tokens/s")
    add_model_args(bench)
    bench.add_argument("--num-prompts", type=int, default=8)
    bench.add_argument("--input-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=64)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
