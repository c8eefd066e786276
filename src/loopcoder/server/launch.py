"""`loopcoder serve`: load the model, then run the app under uvicorn until SIGTERM or Ctrl-C.

uvicorn's graceful shutdown is the drain: on SIGTERM it stops accepting connections, lets
every in-flight request (streams included) finish, then runs the app's shutdown, which
stops the engine thread.
"""

from __future__ import annotations

import argparse
import os
import sys


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loopcoder.engine.llm import AsyncLLM
    from loopcoder.server.app import ServerSettings, build_app
    from loopcoder.server.loading import default_model_name, load_engine, model_arg

    model = model_arg(args)
    extra = {
        name: value
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks")
        if (value := getattr(args, name)) is not None
    }
    if args.no_prefix_caching:
        extra["enable_prefix_caching"] = False
    llm = AsyncLLM(load_engine(model, args, **extra))
    settings = ServerSettings(
        model_name=args.served_model_name or default_model_name(model),
        api_key=args.api_key or os.environ.get("LOOPCODER_API_KEY") or None,
        max_waiting=args.max_waiting,
    )
    app = build_app(llm, settings)
    print(f"Serving {settings.model_name} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout
    )
    return 0
