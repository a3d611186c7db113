"""The server under test: ``tools/run_text_generation_server.py`` as a child process.

:class:`ServerProcess` starts it on 127.0.0.1 at a free port in a session of its own (so a
``torchrun`` launcher's ranks go with it), its output to a log file (a pipe nobody reads would
block it once full), waits until it listens and answers ``GET /health``, reads its CPU time,
and stops it: SIGTERM to the process group, SIGKILL after a grace period. Use it as a context
manager so that every exit path stops it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import psutil

from megatron.early_exit.launch import free_port

SERVER_SCRIPT = Path(__file__).resolve().parents[4] / "tools" / "run_text_generation_server.py"
DEFAULT_MODE = "default"
"""The mode that passes no ``--batching`` flag (the server's own default)."""
STOP_GRACE_S = 15.0
PORT_ATTEMPTS = 3


def server_command(
    load: str, port: int, mode: str, extra_args: str = "", script: str | Path = SERVER_SCRIPT
) -> list[str]:
    """The command line of one server: ``--batching MODE`` unless ``mode`` is ``default``;
    ``extra_args`` (a shell-quoted string) is appended as is."""
    command = [sys.executable, str(script), "--load", str(load), "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    if mode != DEFAULT_MODE:
        command += ["--batching", mode]
    return command + shlex.split(extra_args)


class ServerStartError(RuntimeError):
    """The server exited or did not answer ``/health`` in time (the message has its log tail)."""


class PortTaken(Exception):
    """The server could not bind its port."""


class ServerProcess:
    """One server process; ``with ServerProcess(...) as server:`` starts it and always stops it."""

    def __init__(
        self,
        load: str,
        mode: str,
        log_path: Path,
        extra_args: str = "",
        env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 300.0,
        script: str | Path = SERVER_SCRIPT,
    ) -> None:
        self.load, self.mode, self.extra_args, self.script = load, mode, extra_args, script
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = server_command(load, self.port, mode, extra_args, script)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.health: dict | None = None
        self.startup_seconds: float | None = None
        self.exit_code_before_stop: int | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process and wait until it answers ``/health`` on its port; a port taken
        meanwhile by another process (``free_port`` can race) is retried on a fresh one."""
        started = time.perf_counter()
        deadline = started + self.startup_timeout_s
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if attempt > 1:
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.command = server_command(self.load, self.port, self.mode, self.extra_args,
                                              self.script)  # fmt: skip
            try:
                self._start_once(deadline)
            except PortTaken:
                self.stop()
                continue
            self.startup_seconds = time.perf_counter() - started
            return
        raise ServerStartError(f"no free port after {PORT_ATTEMPTS} attempts:\n{self.log_tail()}")

    def _start_once(self, deadline: float) -> None:
        self.exit_code_before_stop = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )  # fmt: skip
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                log_tail = self.log_tail()
                if "address already in use" in log_tail.lower():
                    raise PortTaken(self.port)
                raise ServerStartError(
                    f"the server exited with {self.process.returncode} before answering /health "
                    f"({shlex.join(self.command)}):\n{log_tail}"
                )
            if self._listening():  # ours, not another process that took the port
                try:
                    response = httpx.get(f"{self.url}/health", timeout=2.0)
                    if response.status_code == 200:
                        self.health = response.json()
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        raise ServerStartError(
            f"the server did not answer /health within {self.startup_timeout_s:g} s:\n"
            f"{self.log_tail()}"
        )

    def _processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except (psutil.Error, AttributeError):
            return []

    def _listening(self) -> bool:
        """Whether the server (or one of its ranks) listens on ``self.port``."""
        for process in self._processes():
            try:
                connections = process.net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                   for c in connections):  # fmt: skip
                return True
        return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the server and its live descendants; None if gone."""
        processes = self._processes()
        if not processes:
            return None
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``STOP_GRACE_S``; reaps it."""
        process = self.process
        if process is None:
            return
        if process.poll() is not None:
            self.exit_code_before_stop = process.returncode
        for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
            try:
                os.killpg(process.pid, sig)  # its own session: the group id is its pid
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return "(no log)"


def tokenized_lengths(url: str, prompts: Sequence[str], timeout_s: float = 30.0) -> list[int]:
    """Token counts of ``prompts`` by the server's tokenizer (``POST /tokenize``)."""
    with httpx.Client(timeout=timeout_s) as client:
        lengths = []
        for prompt in prompts:
            response = client.post(f"{url}/tokenize", json={"prompt": prompt})
            response.raise_for_status()
            lengths.append(len(response.json()["tokens"]))
        return lengths
