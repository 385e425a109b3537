"""Training loop shared by every design: the same code drives a remote trunk (Online, Gradfree) or a local emulator (Offline)."""
