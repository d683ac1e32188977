"""A real bus process for tests: :class:`BusProcess` starts ``eventbus serve`` on a free port,
waits until its health check says SERVING, and stops it at the end.

Tests of this package, of the grpcurl docs and of the shared scenarios use it rather than a shared
server, so each test run owns its bus and its configuration (e.g. a tiny subscriber queue). The
binary is ``$EVENTBUS_BIN``, else ``target/debug/eventbus`` of this repository (the test scripts
build it first).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from .bus import Bus

REPO_ROOT = Path(__file__).resolve().parents[3]

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Polls until ``condition()`` is truthy and returns its value; raises ``TimeoutError``
    naming ``what`` after ``timeout`` seconds. Tests poll with a deadline instead of sleeping."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def bus_binary() -> Path:
    """The bus binary: ``$EVENTBUS_BIN`` or ``<repo>/target/debug/eventbus``."""
    configured = os.environ.get("EVENTBUS_BIN")
    path = Path(configured) if configured else REPO_ROOT / "target" / "debug" / "eventbus"
    if not path.is_file():
        raise FileNotFoundError(f"bus binary {path} not found: run `cargo build` or set "
                                "EVENTBUS_BIN")
    return path


def free_port() -> int:
    """A port nobody listens on now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class TestCertificates:
    """PEM files made by :func:`make_test_certificates`: a CA, and a server certificate it
    signed for ``127.0.0.1`` and ``localhost`` with its key."""

    __test__ = False  # not a pytest test class
    ca: Path
    cert: Path
    key: Path


def make_test_certificates(directory: Path) -> TestCertificates:
    """Makes a throwaway CA and server certificate (ECDSA P-256, valid one day) in
    ``directory`` with the ``openssl`` command, at test time, so no private key is ever
    committed. Raises ``FileNotFoundError`` when ``openssl`` is not installed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("the openssl command is needed to make test certificates")
    directory = Path(directory)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, cwd=directory, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA",
        "-days", "1")
    run("req", *ec, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=eventbus")
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "cert.pem", "-days", "1", "-extfile", "server.ext")
    return TestCertificates(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")


class BusProcess:
    """``eventbus serve`` on 127.0.0.1 and a free port. ``settings`` are serve flags without
    dashes, e.g. ``subscriber_queue_size=1`` becomes ``--subscriber-queue-size 1``. A test bus
    keeps its log in memory unless ``storage`` is given (``storage="file", data_dir=...`` for
    one that survives :meth:`restart`). With ``tls`` it serves TLS with those certificates
    (:func:`make_test_certificates`) and :attr:`url` is ``https://``."""

    def __init__(self, tls: TestCertificates | None = None, **settings: Any) -> None:
        self.tls = tls
        if tls is not None:
            settings = {"tls_cert": tls.cert, "tls_key": tls.key, **settings}
        self.settings = settings
        self.port = 0
        #: Set by :meth:`restart`: start again on the same port, so clients reconnect.
        self._keep_port = False
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as grpcio and grpcurl take it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with TLS), as the Rust CLI and
        ``EVENTBUS_SERVER`` take it."""
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def start(self, timeout: float = 15.0) -> BusProcess:
        """Starts the bus and returns once it serves. A port taken between choosing it and the
        bus binding it makes the bus exit; that is retried on another port."""
        for _ in range(1 if self._keep_port else 3):
            if not self._keep_port:
                self.port = free_port()
            args = [str(bus_binary()), "serve", "--listen", self.address,
                    "--log-level", "warn"]
            # The bus's own default is its durable file store in ./eventbus-data; a test bus
            # keeps its log in memory unless the test asks for storage settings.
            if "storage" not in self.settings:
                args += ["--storage", "memory"]
            for key, value in self.settings.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
            self._log = tempfile.TemporaryFile()
            self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
            probe = (Bus(self.url, tls_ca=self.tls.ca) if self.tls is not None
                     else Bus(self.address))
            with probe as bus:
                try:
                    bus.wait_ready(timeout)
                    return self
                except Exception:
                    if self.process.poll() is None:
                        self.stop()
                        raise RuntimeError(f"bus not serving within {timeout} s:\n"
                                           f"{self.output()}") from None
        raise RuntimeError(f"bus did not start:\n{self.output()}")

    def output(self) -> str:
        """What the bus logged so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash: no graceful shutdown, open streams break."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, *, crash: bool = True, down_for: float = 0.0,
                timeout: float = 15.0) -> BusProcess:
        """Stops the bus (SIGKILL when ``crash``, else SIGTERM), waits ``down_for`` seconds,
        and starts it again on the same port with the same settings."""
        if crash:
            self.kill()
        else:
            self.stop()
        time.sleep(down_for)
        self._keep_port = True
        return self.start(timeout)

    def __enter__(self) -> BusProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nats_binary() -> str:
    """The nats-server for JetStream tests: ``$EVENTBUS_TEST_NATS_SERVER``, else ``nats-server``
    on the ``PATH`` (``scripts/nats-server.sh system`` prints the machine's)."""
    configured = os.environ.get("EVENTBUS_TEST_NATS_SERVER")
    found = configured or shutil.which("nats-server") or shutil.which("/usr/sbin/nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install it or set "
                                "EVENTBUS_TEST_NATS_SERVER")
    return found


class NatsServer:
    """A nats-server with JetStream on 127.0.0.1 and a port of its choosing, with a temporary
    store, for clustered buses in tests (``BusProcess(storage="jetstream",
    nats_url=nats.url)``). Its config raises ``max_payload`` to 8 MB: a bus refuses NATS's
    default 1 MB, which is under its own event limit. :meth:`kill` and :meth:`restart` crash it
    and bring it back on its port with its store; :meth:`signal` freezes it. As
    ``tests/common/nats.rs``."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._log: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Starts the server: on a port of its choosing with a new store the first time, on
        the same port with the same store after :meth:`kill`."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="eventbus-nats-")
        config = Path(self._dir.name) / "nats.conf"
        config.write_text("max_payload: 8MB\n")
        process = subprocess.Popen(
            [nats_binary(), "-a", "127.0.0.1", "-p", str(self.port or -1), "-js", "-sd",
             str(Path(self._dir.name) / "jetstream"), "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.process = process
        listening = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
        found = threading.Event()

        def read() -> None:
            assert process.stderr is not None
            for raw in process.stderr:
                line = raw.decode(errors="replace")
                self._log.append(line)
                match = listening.search(line)
                if match and not found.is_set():
                    self.port = int(match.group(1))
                    found.set()

        threading.Thread(target=read, name="nats-server-log", daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            raise RuntimeError(f"nats-server not listening within {timeout} s:\n"
                               f"{''.join(self._log)}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash; the store is kept for :meth:`restart`."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout: float = 15.0) -> NatsServer:
        """Starts the server again after :meth:`kill` (killing it first if it runs), on the
        same port with the same JetStream store, as an operator restarting it would."""
        self.kill()
        return self.start(timeout)

    def signal(self, number: int) -> None:
        """Sends the process a signal: ``signal.SIGSTOP`` freezes it (its connections stay
        open and unanswered), ``signal.SIGCONT`` lets it go on."""
        assert self.process is not None
        self.process.send_signal(number)

    def stop(self) -> None:
        """Kills the server and deletes its store."""
        self.kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
