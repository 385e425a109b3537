"""Keys and signatures: CURVE key pairs for the channel, Ed25519 for signed artifacts.

- :mod:`~guardedp2p.crypto.keys`: key files (``NAME.key`` / ``NAME.key_secret`` for CURVE, ``NAME.sign.pub`` /
  ``NAME.sign.key`` for Ed25519), generation, loading, permission checks;
- :mod:`~guardedp2p.crypto.manifest`: signed folder manifests (SHA-256 of every file + an Ed25519 signature)
  and their verification, used by the Offline emulator and the adapter bundles.

All primitives come from ``cryptography`` and libzmq's CURVE; nothing here implements a cipher.
"""
