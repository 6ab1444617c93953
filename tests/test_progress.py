"""Progress of long loops: a tqdm bar on a terminal, a few plain lines in a log file."""

import io

from tqdm.auto import tqdm

from toy_task import train_toy
from vqgen import progress
from vqgen.progress import PlainProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_plain_line_every_interval_with_step_and_total(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="train toy", unit="step", file=log, interval=5.0)
    assert isinstance(bar, PlainProgress)
    with bar:
        for n in range(1000):
            clock[0] = n * 0.125  # 125 s in all: a line every 40 updates
            if n == 500:
                bar.set_postfix({"loss": "0.5"})
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 25  # 24 on the way, the last at close()
    assert lines[0] == "train toy: 41/1000 step (4%), 8.2 step/s, 5 s, ~117 s left"
    assert lines[-1] == "train toy: 1000/1000 step (100%), 8.01 step/s, 125 s, loss=0.5"


def test_an_iterable_is_passed_through_and_a_disabled_bar_prints_nothing():
    log = io.StringIO()
    assert list(progress_bar(range(3), desc="encode", unit="img", file=log)) == [0, 1, 2]
    assert log.getvalue().count("\n") == 1 and log.getvalue().startswith("encode: 3/3 img (100%), ")  # at the end
    quiet = io.StringIO()
    assert list(progress_bar(range(3), file=quiet, disable=True)) == [0, 1, 2] and quiet.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    term = Terminal()
    bar = progress_bar(total=3, desc="encode", file=term)
    assert isinstance(bar, tqdm)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()


def test_training_into_a_log_prints_plain_lines(tmp_path, capsys):
    train_toy(tmp_path / "run", {"steps": 4, "batch_size": 8})
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train toy: ")]
    assert lines and lines[-1].startswith("train toy: 4/4 step (100%)")
