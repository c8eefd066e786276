"""The small demo LoopCoder shipped with the package, trained by `scripts/train_demo.py`.

Its files follow the Hugging Face layout of the released IQuest LoopCoder checkpoints.
"""

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent
