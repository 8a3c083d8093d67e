"""Progress output: a live bar on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io

from lcsc_ray.progress import progress


def test_a_log_gets_plain_lines_not_carriage_returns():
    log = io.StringIO()
    bar = progress(range(5000), desc="cm training", unit="step", stream=log)
    for step in bar:
        if step % 100 == 0:
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and 1 <= len(lines) <= 3  # at most one line per 15 s, plus the first and last
    assert lines[-1].startswith("cm training: 100%") and "5000/5000" in lines[-1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_live_bar():
    screen = _Terminal()
    for _ in progress(range(50), desc="held-out scoring", stream=screen):
        pass
    assert "\r" in screen.getvalue() and "50/50" in screen.getvalue()
