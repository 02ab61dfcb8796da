from __future__ import annotations

import logging

import pytest

from d2engine.utils.logger import (
    _ColorfulFormatter,
    log_every_n,
    log_first_n,
    setup_logger,
)


@pytest.fixture
def fresh_name(request) -> str:
    name = f"d2test_{request.node.name}"
    yield name
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def test_setup_logger_directory_and_file(tmp_path, fresh_name, capsys) -> None:
    logger = setup_logger(tmp_path / "out", name=fresh_name)
    logger.info("hello")
    assert "hello" in capsys.readouterr().out
    assert "hello" in (tmp_path / "out" / "log.txt").read_text()

    logger = setup_logger(tmp_path / "run.log", name=fresh_name)  # replaces the handlers
    logger.info("again")
    assert capsys.readouterr().out.count("again") == 1
    assert "again" in (tmp_path / "run.log").read_text()
    assert "again" not in (tmp_path / "out" / "log.txt").read_text()
    assert logger.level == logging.DEBUG and not logger.propagate


def test_setup_logger_other_rank(tmp_path, fresh_name, capsys) -> None:
    logger = setup_logger(tmp_path, distributed_rank=2, name=fresh_name)
    logger.warning("rank two")
    assert "rank two" not in capsys.readouterr().out  # no console on ranks > 0
    assert "rank two" in (tmp_path / "log.txt.rank2").read_text()
    assert not (tmp_path / "log.txt").exists()


def test_colorful_formatter_abbreviates_and_colors() -> None:
    fmt = _ColorfulFormatter(root_name="d2engine", abbrev_name="d2")
    record = logging.LogRecord(
        "d2engine.engine", logging.WARNING, __file__, 1, "careful", None, None
    )
    out = fmt.format(record)
    assert "d2.engine" in out and "careful" in out and "WARNING" in out and "\x1b[" in out
    assert record.name == "d2engine.engine"  # the record itself is untouched


def test_log_first_n_and_every_n(caplog) -> None:
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            log_first_n(logging.INFO, "first", n=2)
        for _ in range(7):
            log_every_n(logging.INFO, "every", n=3)
        for i in range(3):
            log_first_n(logging.INFO, f"msg{i % 2}", n=1, key="message")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("first") == 2
    assert msgs.count("every") == 3  # calls 1, 4, 7
    assert msgs.count("msg0") == 1 and msgs.count("msg1") == 1
    assert caplog.records[0].name == __name__
    with pytest.raises(ValueError, match="key must be"):
        log_first_n(logging.INFO, "x", key="bogus")


def test_create_small_table_is_a_centred_pipe_table() -> None:
    from d2engine.utils.logger import create_small_table

    table = create_small_table({"AP": 0.512, "AP50": 70.1, "n": 3, "name": "x"})
    assert table.splitlines() == [
        "|  AP   |  AP50  |  n  |  name  |",
        "|:-----:|:------:|:---:|:------:|",
        "| 0.512 | 70.100 |  3  |   x    |",
    ]
    with pytest.raises(ValueError, match="at least one value"):
        create_small_table({})
