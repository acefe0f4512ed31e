"""Shared pieces of the Python package's tests: paths from the command line, the package on
sys.path, a loopback nvfp4cal-server, running the CLIs.

Every test program takes --build DIR (the CMake build folder: build/client/nvfp4cal,
build/server/nvfp4cal-server, build/python stubs) and passes the rest to unittest.
"""

import argparse
import os
import signal
import subprocess
import sys
import unittest

try:
    import numpy  # noqa: F401
    import torch  # noqa: F401
except ImportError as missing:  # pragma: no cover - depends on the machine
    print(f"SKIPPED: {missing}; install python3-torch python3-numpy python3-grpcio "
          "python3-grpc-tools (Debian)")
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.abspath(os.path.join(HERE, "..", ".."))
PYTHON_DIR = os.path.join(SOURCE, "python")
sys.path.insert(0, PYTHON_DIR)
sys.path.insert(0, HERE)
ARGS = argparse.Namespace(build=None, tool=None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", required=True, help="the CMake build folder")
    parser.add_argument("--tool", help="write_hessians_tool binary")
    args, rest = parser.parse_known_args()
    ARGS.build, ARGS.tool = os.path.abspath(args.build), args.tool
    stubs = os.path.join(ARGS.build, "python")
    sys.path.insert(0, stubs)
    os.environ["NVFP4CAL_PY_STUBS"] = stubs
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


def cli_binary():
    return os.path.join(ARGS.build, "client", "nvfp4cal")


def server_binary():
    return os.path.join(ARGS.build, "server", "nvfp4cal-server")


def run(command, **kwargs):
    """subprocess.run with text output captured and the package importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PYTHON_DIR, HERE, os.path.join(ARGS.build, "python")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, **kwargs)


def run_python_cli(*args):
    return run([sys.executable, "-m", "nvfp4cal"] + [str(a) for a in args])


class Server:
    """nvfp4cal-server on a free loopback port (--device=cpu)."""

    def __init__(self, *flags):
        self.process = subprocess.Popen(
            [server_binary(), "--address=127.0.0.1:0", "--metrics_address=", "--device=cpu"]
            + list(flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.address = None
        for line in self.process.stdout:
            if line.startswith("listening on "):
                self.address = line[len("listening on "):].strip()
                break
        if self.address is None:
            self.process.wait()
            raise RuntimeError("the server printed no 'listening on' line: " +
                               self.process.stderr.read())

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()
