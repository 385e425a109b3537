"""Typer command-line interface: ``guardedp2p keys|provider|client|demo|evaluate``."""
