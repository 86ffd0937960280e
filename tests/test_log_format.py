"""Log lines: plain text for a person at a terminal, JSON for a pipe or a file; `--log-format` decides
when given. The model-loading progress bar never shares a line with a log record."""

import fcntl
import json
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from server.api.logging import configure_logging
from tests.server_harness import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_logging():
    root, library = logging.getLogger(), logging.getLogger("transformers")
    handlers, level = root.handlers[:], root.level
    library_handlers, propagate = library.handlers[:], library.propagate
    bars = hf_logging.is_progress_bar_enabled()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    library.handlers[:], library.propagate = library_handlers, propagate
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


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


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows: a carriage return moves back to the line's start and what follows overwrites."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        column = 0
        for char in line:
            if char == "\r":
                column = 0
                continue
            cells[column:column + 1] = [char]
            column += 1
        lines.append("".join(cells).rstrip())
    return [line for line in lines if line]


def test_a_log_line_at_a_terminal_is_written_above_the_loading_bar(monkeypatch, restore_logging):
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    stream = os.fdopen(follower, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("auto")
    # transformers' own bar, as its weight loader opens it (a record arrives while it is drawn half-way).
    with hf_logging.tqdm(range(4), desc="Loading weights", file=stream, mininterval=0) as bar:
        for step in bar:
            if step == 2:
                logging.getLogger("server.test").info("hello while loading")
    stream.flush()
    raw = b""
    while chunk := _read_ready(leader):
        raw += chunk
    stream.close()
    os.close(leader)
    screen = _screen(raw.decode())
    record = [line for line in screen if "hello while loading" in line]
    assert len(record) == 1 and record[0].endswith("INFO server.test: hello while loading"), screen
    assert "Loading weights" not in record[0]
    assert screen[-1].startswith("Loading weights: 100%"), screen


def _read_ready(fd: int) -> bytes:
    return os.read(fd, 65536) if select.select([fd], [], [], 0.2)[0] else b""


def test_json_logs_have_no_bar_and_carry_transformers_records(tmp_path, monkeypatch, restore_logging):
    stream = open(tmp_path / "log", "w")
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json")
    with hf_logging.tqdm(range(3), desc="Loading weights", file=stream, mininterval=0) as bar:
        for _ in bar:
            logging.getLogger("server.test").info("loading")
    hf_logging.get_logger("transformers.modeling_utils").warning("a library warning")
    stream.close()
    records = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert [r["message"] for r in records] == ["loading"] * 3 + ["a library warning"]
    assert records[-1]["logger"] == "transformers.modeling_utils"


def test_serve_on_a_pipe_writes_only_json_records(tmp_path):
    """`loraserve serve` with stderr on a pipe, from the first import to shutdown: one JSON record per line, the
    model load among them, and no progress bar."""
    log = tmp_path / "stderr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORASERVE_CPU_KERNEL": "0"}
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(REPO / "demo" / "base"),
               "--adapters-dir", str(tmp_path / "adapters"), "--port", str(free_port())]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while "Application startup complete" not in log.read_text() and process.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        finally:
            process.terminate()
            process.wait(timeout=60)
    text = log.read_text()
    assert "Loading weights" not in text and "\r" not in text, text
    records = [json.loads(line) for line in text.splitlines()]
    assert any(re.match("loading base model", r["message"]) for r in records)
