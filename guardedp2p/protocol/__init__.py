"""The sans-I/O core every design shares.

- :mod:`~guardedp2p.protocol.provider`: :class:`ProviderApp`, ``handle(peer, frames) -> reply frames``: sessions
  bound to the peer's authenticated key, the handshake, rate limits, and dispatch to a design's session
  handler. It never touches a socket and takes its clock as an argument.
- :mod:`~guardedp2p.protocol.client`: :class:`ClientSession`, the client end: HELLO, request/reply checks, byte
  counters per message type, over any channel.

Design-specific handlers live in :mod:`guardedp2p.designs`; channels in :mod:`guardedp2p.transport`.
"""
