"""Building the engine for `serve` and `chat`: which checkpoint, the name it is served under,
and a progress bar while its weights load (a 40B checkpoint takes minutes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from loopcoder.cli import engine_args
from loopcoder.engine.engine import LLMEngine

DEMO_NAME = "loopcoder-demo"


class ProgressBar:
    """A `progress(done, total)` callback drawing one line on a terminal stream."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} tensors")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def model_arg(args: argparse.Namespace) -> str | None:
    """The checkpoint named positionally or by --model (None: the demo model)."""
    if args.model_path and args.model and args.model_path != args.model:
        raise ValueError(f"two models given: {args.model_path} and --model {args.model}")
    return args.model_path or args.model


def default_model_name(model: str | None) -> str:
    return DEMO_NAME if model in (None, "demo") else Path(model).resolve().name


def load_engine(model: str | None, args: argparse.Namespace, **extra) -> LLMEngine:
    kwargs = engine_args(args) | extra
    return LLMEngine(model, progress=ProgressBar(f"Loading {default_model_name(model)}"), **kwargs)
