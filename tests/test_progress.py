"""Progress output: a bar on a terminal, one plain line per log interval (no carriage returns) in a batch log."""

from __future__ import annotations

import io
import logging

from trainer.loop import progress_line, progress_style


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_terminal_gets_a_bar_and_a_log_file_gets_lines():
    assert progress_style(True, True, _Stream(tty=True)) == "bar"
    assert progress_style(True, True, _Stream(tty=False)) == "lines"
    assert progress_style(True, False, _Stream(tty=True)) == "off"  # other ranks
    assert progress_style(False, True, _Stream(tty=True)) == "off"  # train.progress_bar=false


def test_a_progress_line_has_step_loss_throughput_mfu_and_eta():
    assert progress_line(120, 600, 3.21449, 12345.6, 0.75, 0.3123) == (
        "step 120/600 (20%) | loss 3.2145 | 12,346 tok/s | MFU 31.2% | ETA 0:06:00")
    assert progress_line(10, 20000, 2.0, 10.0, 1.0, None) == "step 10/20000 (0%) | loss 2.0000 | 10 tok/s | ETA 5:33:10"


def test_a_run_whose_output_is_not_a_terminal_logs_lines(small_run, capfd, caplog):
    from trainer.run import run

    caplog.set_level(logging.INFO, logger="trainer.loop")
    run(small_run("train.progress_bar=true", "train.max_steps=4", "train.log_interval=2", "train.eval_interval=0",
                  "train.checkpoint_interval=0"))
    lines = [r.getMessage() for r in caplog.records if " tok/s" in r.getMessage()]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4 (50%)", "step 4/4 (100%)"]
    assert all("| ETA " in line for line in lines)
    assert "\r" not in capfd.readouterr().err
