"""guardedp2p: two-party privacy-preserving LLM fine-tuning (GuardedTuning) over authenticated ZeroMQ."""

__version__ = "0.1.0"
