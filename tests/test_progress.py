"""What a person sees while a run trains: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import io
import logging

from ddetr.train.progress import EpochProgress


def test_plain_lines_every_n_steps_with_rate_eta_and_loss(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    with caplog.at_level(logging.INFO, logger="ddetr.train"):
        progress = EpochProgress(epoch=0, epochs=3, total=10, done=0, enabled=True, every=4)
        for loss in [5.0] * 10:
            progress.update(loss)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/3 step 4/10 (40%)")
    assert "steps/s" in lines[1] and "ETA" in lines[1] and "loss 5.000" in lines[1]


def test_a_bar_on_a_terminal_and_nothing_on_other_ranks(caplog, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with caplog.at_level(logging.INFO, logger="ddetr.train"):
        bar = EpochProgress(epoch=1, epochs=2, total=5, done=2, enabled=True, every=1)
        for _ in range(3):
            bar.update(2.0)
        bar.close()
        quiet = EpochProgress(epoch=1, epochs=2, total=5, done=0, enabled=False, every=1)
        quiet.update(1.0)
        quiet.close()
    drawn = terminal.getvalue()
    assert "epoch 2/2" in drawn and "5/5" in drawn and "loss 2.000" in drawn
    assert caplog.records == []  # the bar replaces the lines; a disabled rank says nothing
