"""A local nvfp4cal-server for sequential calibration (sequential.py, which re-exports both
names; the CLI's --sequential without --server): finding the binary, and running it on a
loopback port with a random bearer token for one run.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Callable, Optional, Sequence

from .sequential_layers import SequentialError


def find_server_binary(explicit: Optional[str] = None, nvfp4cal: Optional[str] = None) -> str:
    """The nvfp4cal-server binary: `explicit`, $NVFP4CAL_SERVER_BIN, beside the nvfp4cal binary
    (`nvfp4cal`, $NVFP4CAL_BIN or on PATH; also ../server/ of a CMake build's client/), or on
    PATH. SequentialError when none is found."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise SequentialError(f"--nvfp4cal-server {explicit}: not an executable file")
        return explicit
    candidates = [os.environ.get("NVFP4CAL_SERVER_BIN")]
    for cli in (nvfp4cal, os.environ.get("NVFP4CAL_BIN"), shutil.which("nvfp4cal")):
        if cli:
            folder = os.path.dirname(os.path.abspath(cli))
            candidates += [os.path.join(folder, "nvfp4cal-server"),
                           os.path.join(folder, "..", "server", "nvfp4cal-server")]
    candidates.append(shutil.which("nvfp4cal-server"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.normpath(candidate)
    raise SequentialError("--sequential quantizes each layer on an nvfp4cal server: give "
                          "--server HOST:PORT, or --nvfp4cal-server PATH (started on a loopback "
                          "port for the run), or put nvfp4cal-server on PATH or beside nvfp4cal")


class LocalServer:
    """nvfp4cal-server on a free 127.0.0.1 port for one run, with a random bearer token (a
    0600 file in a private temporary folder) so that no other local user's calls are served.
    `client()` gives an nvfp4cal.Client to it; `stop()` (SIGTERM, then kill) ends it."""

    def __init__(self, binary: str, device: str = "auto", flags: Sequence[str] = (),
                 startup_timeout: float = 120.0,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.binary = binary
        self._dir = tempfile.mkdtemp(prefix="nvfp4cal-server-")
        self.token = secrets.token_hex(24)
        token_file = os.path.join(self._dir, "token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        self._log_path = os.path.join(self._dir, "server.log")
        self._stderr = open(self._log_path, "wb")
        command = [binary, "--address=127.0.0.1:0", "--metrics_address=", f"--device={device}",
                   f"--auth_token_file={token_file}"] + list(flags)
        try:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr,
                                            stdin=subprocess.DEVNULL)
        except OSError as error:
            self._cleanup()
            raise SequentialError(f"cannot start {binary}: {error}") from None
        lines: "queue.Queue[Optional[bytes]]" = queue.Queue()

        def drain():  # reads stdout to its end so that the server never blocks on it
            for line in self.process.stdout:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=drain, daemon=True).start()
        self.address = None
        deadline = time.monotonic() + startup_timeout
        while self.address is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise SequentialError(f"{binary} did not start (no 'listening on' line within "
                                      f"{startup_timeout:.0f} s): {self._tail()}")
            text = line.decode("utf-8", "replace")
            if text.startswith("listening on "):
                self.address = text[len("listening on "):].strip()
        log(f"nvfp4cal sequential: started {binary} on {self.address} (device {device})")

    def _tail(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                text = f.read()[-2000:].decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        code = self.process.poll()
        return (f"exit code {code}; " if code is not None else "") + (text or "no output")

    def client(self, **options):
        from .client import Client  # pylint: disable=import-outside-toplevel
        return Client([self.address], token=self.token, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        try:
            self._stderr.close()
        except (AttributeError, OSError):
            pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *_) -> None:
        self.stop()
