"""guardedp2p: two-party privacy-preserving LLM fine-tuning (GuardedTuning) over authenticated ZeroMQ."""

from guardedp2p import _compat

__version__ = "0.1.0"

_compat.install()
