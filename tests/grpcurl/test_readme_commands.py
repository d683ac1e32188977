"""Runs every command of the ```console blocks of README.md (its section "Explore with grpcurl")
against a fresh bus and checks that each prints what the document shows, so the docs cannot go stale.

The document's ```console blocks hold ``$ command`` lines, each followed by its output. Commands
run in document order with bash, from the repository root, with the Python client's virtualenv
(grpcurl, python) and ``target/debug`` on PATH, and ``localhost:50051`` replaced by the test bus's
address. A command ending in ``&`` runs in the background until the end, once it has printed its
documented lines. Ids, times and reply inboxes differ per run, so both sides are normalised
before comparing.

After changing the document, fill in the outputs from a real run with::

    clients/python/.venv/bin/python tests/grpcurl/test_readme_commands.py --update
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from eventbus_client.testing import BusProcess

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "README.md"
DOC_ADDRESS = "localhost:50051"
COMMAND_TIMEOUT = 30.0

NORMALISE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"_bus\.inbox\.[0-9a-f]+"), "_bus.inbox.<id>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"), "<time>"),
]


def normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        line = line.rstrip()
        for pattern, replacement in NORMALISE:
            line = pattern.sub(replacement, line)
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return out


@dataclass
class Command:
    """One ``$`` command of the document and the output lines it shows."""

    lines: list[str]
    output: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        joined = "\n".join(self.lines)
        return joined.removeprefix("$ ")

    @property
    def background(self) -> bool:
        return self.text.rstrip().endswith("&")

    @property
    def script(self) -> str:
        return self.text.rstrip().removesuffix("&").rstrip()


@dataclass
class Block:
    """A console block: its position in the document and its commands."""

    start: int
    end: int
    commands: list[Command]


def complete(lines: list[str]) -> bool:
    """Whether the command lines so far form a whole shell command (no open quote or ``\\``)."""
    text = "\n".join(lines)
    if text.endswith("\\"):
        return False
    try:
        shlex.split(text)
    except ValueError:
        return False
    return True


def parse(document: list[str]) -> list[Block]:
    blocks = []
    index = 0
    while index < len(document):
        if document[index].strip() != "```console":
            index += 1
            continue
        start = index
        index += 1
        commands: list[Command] = []
        while document[index].strip() != "```":
            line = document[index]
            if line.startswith("$ "):
                command = Command([line])
                while not complete(command.lines):
                    index += 1
                    command.lines.append(document[index])
                commands.append(command)
            else:
                assert commands, f"{DOC.name}:{index + 1}: output before any command"
                commands[-1].output.append(line)
            index += 1
        blocks.append(Block(start, index, commands))
        index += 1
    return blocks


class Background:
    """A background command: its output is read on a thread until it is stopped."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, expected: list[str]) -> list[str]:
        """Waits until it printed the expected lines (at least one line when none is given)."""
        deadline = time.monotonic() + COMMAND_TIMEOUT
        want = normalise(expected)
        while True:
            got = list(self.lines)
            if (want and normalise(got[:len(want)]) == want) or (not want and got):
                return got[:max(len(want), 1)]
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"background command printed {got}, expected {expected}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def environment(bus: BusProcess) -> dict[str, str]:
    venv_bin = REPO / "clients" / "python" / ".venv" / "bin"
    python_bin = Path(sys.executable).parent
    path = os.pathsep.join([str(venv_bin), str(python_bin), str(REPO / "target" / "debug"),
                            os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "EVENTBUS_SERVER": bus.url}


def run_document(blocks: list[Block]) -> list[tuple[Command, list[str]]]:
    """Runs every command against a fresh bus; returns each with the lines it printed."""
    results = []
    background: list[Background] = []
    with BusProcess() as bus:
        env = environment(bus)
        try:
            for block in blocks:
                for command in block.commands:
                    script = command.script.replace(DOC_ADDRESS, bus.address)
                    if command.background:
                        process = subprocess.Popen(
                            ["bash", "-c", f"exec {script}"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                        runner = Background(process)
                        background.append(runner)
                        results.append((command, runner.wait_for(command.output)))
                    else:
                        finished = subprocess.run(
                            ["bash", "-c", script], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=COMMAND_TIMEOUT)
                        results.append((command, finished.stdout.splitlines()))
        finally:
            for runner in background:
                runner.stop()
    return results


def test_grpcurl_is_the_documented_version() -> None:
    venv_bin = REPO / "clients" / "python" / ".venv" / "bin"
    found = subprocess.run(["grpcurl", "--version"], text=True, capture_output=True,
                           env={**os.environ, "PATH": f"{venv_bin}{os.pathsep}"
                                f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert "1.8.6" in found.stdout + found.stderr


def test_document_covers_the_issue() -> None:
    texts = [c.text for b in parse(DOC.read_text().splitlines()) for c in b.commands]
    for needle in [" list", " describe ", "Health/Check", "/Publish", "/Subscribe", "/Query"]:
        assert any(needle in text for text in texts), f"no command with {needle!r}"
    assert any("/Publish" in t and t.count('"topic"') > 1 for t in texts), "no batch publish"
    assert all(c.output for b in parse(DOC.read_text().splitlines()) for c in b.commands), \
        "a command without output: run this file with --update"


def test_documented_commands_print_what_the_document_shows() -> None:
    blocks = parse(DOC.read_text().splitlines())
    mismatches = []
    for command, actual in run_document(blocks):
        if normalise(actual) != normalise(command.output):
            mismatches.append(f"$ {command.text}\n--- documented\n" + "\n".join(command.output)
                              + "\n--- actual\n" + "\n".join(actual))
    assert not mismatches, "\n\n".join(mismatches)


def update() -> None:
    """Rewrites the outputs in the document from a real run."""
    document = DOC.read_text().splitlines()
    blocks = parse(document)
    actual = dict((id(command), lines) for command, lines in run_document(blocks))
    for block in reversed(blocks):
        body: list[str] = []
        for command in block.commands:
            body += command.lines + actual[id(command)]
        document[block.start + 1:block.end] = body
    DOC.write_text("\n".join(document) + "\n")
    print(f"updated {DOC}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update()
    else:
        sys.exit(f"usage: {sys.argv[0]} --update")
