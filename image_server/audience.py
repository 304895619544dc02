"""Which topics the events socket's subscribers want, as an XPUB reports them.

After a restart, resumed requests finish before their clients have re-subscribed; what is
published then reaches nobody. ``Audience.heard`` lets a resumed result wait until a
subscription covering its topic has arrived, or a grace period has passed.
"""

from __future__ import annotations

import asyncio


class Audience:
    def __init__(self) -> None:
        self._subscriptions: set[bytes] = set()
        self._covered: dict[bytes, bool] = {}  # topic -> covers(topic), until the next change
        self._changed = asyncio.Event()
        self._closed = False

    def close(self) -> None:
        """Stop waiting (shutdown: what is still held back goes out now, or not at all)."""
        self._closed = True
        self._changed.set()

    def observe(self, frame: bytes) -> None:
        """An XPUB subscription message: ``\\x01<prefix>`` subscribes; ``\\x00<prefix>``
        arrives when the last subscriber to a prefix has left (or disconnected)."""
        self._covered.clear()
        if frame[:1] == b"\x01":
            self._subscriptions.add(frame[1:])
            self._changed.set()
            self._changed = asyncio.Event()
        elif frame[:1] == b"\x00":
            self._subscriptions.discard(frame[1:])

    def covers(self, topic: bytes) -> bool:
        """Whether some subscription is a prefix of ``topic``; looked up per prefix of the
        topic (and remembered), so the cost does not grow with the number of subscribers."""
        known = self._covered.get(topic)
        if known is None:
            known = any(topic[:length] in self._subscriptions for length in range(len(topic) + 1))
            if len(self._covered) > 4096:  # one entry per client and type: bounded all the same
                self._covered.clear()
            self._covered[topic] = known
        return known

    async def heard(self, topic: bytes, grace_s: float) -> bool:
        """Wait until someone subscribes to ``topic`` (True) or ``grace_s`` passes (False)."""
        try:
            async with asyncio.timeout(grace_s):
                while not self.covers(topic) and not self._closed:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True
