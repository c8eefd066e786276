"""The `serve` and `chat` subcommands' arguments (their code loads only when they run)."""

from __future__ import annotations

import argparse

from loopcoder.cli import add_model_args


def _run_serve(args: argparse.Namespace) -> int:
    from loopcoder.server.launch import run_serve

    return run_serve(args)


def _run_chat(args: argparse.Namespace) -> int:
    from loopcoder.server.chat_cli import run_chat

    return run_chat(args)


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, tools, metrics)")
    serve.add_argument("model_path", nargs="?", metavar="MODEL", help="checkpoint folder (default: the embedded demo model)")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this bearer token on /v1 routes (or set LOOPCODER_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="model name clients use (default: the folder's name)")
    serve.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch")
    serve.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step")
    serve.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    serve.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="prompts allowed to wait for their first token; past it requests get 503 + Retry-After")
    serve.add_argument("--drain-timeout", type=float, default=None,
                       help="on SIGTERM, seconds to let running requests finish (default: no limit)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_run_serve)


def add_chat_command(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", help="interactive chat in the terminal (streams; /reset clears the history)")
    chat.add_argument("model_path", nargs="?", metavar="MODEL", help="checkpoint folder (default: the embedded demo model)")
    add_model_args(chat)
    chat.add_argument("--system", default=None, help="system message that starts every conversation")
    chat.add_argument("--max-tokens", type=int, default=None, help="longest reply (default: what the context leaves)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(func=_run_chat)
