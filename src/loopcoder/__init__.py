"""loopcoder: exact, fast inference for IQuest LoopCoder models."""
