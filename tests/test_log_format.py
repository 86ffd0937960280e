"""Log lines: plain text for a person at a terminal, JSON for a pipe or a file; `--log-format` decides
when given."""

import json
import logging
import os
import sys

import pytest

from server.api.logging import configure_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("log_format, terminal, expect_json", [
    ("auto", True, False), ("auto", False, True), ("json", True, True), ("text", False, False)])
def test_auto_is_text_at_a_terminal_and_json_elsewhere(log_format, terminal, expect_json, tmp_path, monkeypatch,
                                                       restore_logging):
    if terminal:
        leader, follower = os.openpty()
        stream = os.fdopen(follower, "w")
    else:
        leader, stream = None, open(tmp_path / "log", "w")
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(log_format)
    logging.getLogger("server.test").info("hello %s", "there")
    stream.flush()
    line = os.read(leader, 4096).decode() if terminal else (tmp_path / "log").read_text()
    stream.close()
    if leader is not None:
        os.close(leader)
    if expect_json:
        assert json.loads(line)["message"] == "hello there"
    else:
        assert line.rstrip().endswith("INFO server.test: hello there") and not line.startswith("{")
