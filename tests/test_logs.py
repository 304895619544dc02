"""RateLimitedLog: a flood of refusals cannot flood the log."""

from __future__ import annotations

import logging

from image_server.logs import RateLimitedLog


def test_lines_beyond_the_budget_are_counted_and_summarised(caplog):
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("flood"), per_interval=3, interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="flood"):
        for i in range(100):
            log.warning("bad message %d", i)
        assert [r.getMessage() for r in caplog.records] == ["bad message 0", "bad message 1", "bad message 2"]
        now[0] = 10.0
        log.warning("later")
    assert [r.getMessage() for r in caplog.records][-2:] == ["97 similar warnings suppressed in the last 10s", "later"]
