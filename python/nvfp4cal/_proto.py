"""The generated protobuf module of proto/nvfp4cal/v1/calibrator.proto, found or generated.

`load()` returns `nvfp4cal.v1.calibrator_pb2`. The stubs are never checked in; they come from,
in this order:

1. a folder holding `nvfp4cal/v1/calibrator_pb2.py` on `sys.path` or in `$NVFP4CAL_PY_STUBS`
   (the CMake build writes them to `build/python`: `PYTHONPATH=python:build/python`), or the
   package itself (`pip install ./python` generates them into it when protoc is available);
2. a cache folder (`$XDG_CACHE_HOME/nvfp4cal/stubs-<hash>`), generated on first use from the
   .proto shipped with the package or found in the checkout, with `protoc` (>= 3.15, for
   proto3 `optional`) or `grpc_tools.protoc` (pip's grpcio-tools);
3. otherwise ImportError saying how to get them.

Run as a program it generates the stubs (what CMake and setup.py do; by path, so that neither
torch nor the package needs to be importable):
    python3 python/nvfp4cal/_proto.py --proto-root proto --out build/python [--protoc protoc]

Debian 12's python3-grpc-tools bundles protoc 3.5, which cannot parse `optional`: the message
module is written by the system protoc, and grpc_tools then writes the service stubs
(`calibrator_pb2_grpc.py`, optional: the client calls the methods by name) from its
descriptor set.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional

PROTO = "nvfp4cal/v1/calibrator.proto"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_HINT = ("generate them with the CMake build (they go to build/python: run with "
         "PYTHONPATH=python:build/python), or `python3 -m nvfp4cal._proto --proto-root proto "
         "--out DIR` (or python/nvfp4cal/_proto.py ...) and set NVFP4CAL_PY_STUBS=DIR; this needs protoc >= 3.15 on PATH "
         "(Debian: protobuf-compiler) or `pip install grpcio-tools`")


def _proto_roots() -> List[str]:
    """Folders holding nvfp4cal/v1/calibrator.proto: shipped in the package, or the checkout's
    proto/ beside python/."""
    candidates = [os.path.join(_PACKAGE_DIR, "proto"),
                  os.path.join(os.path.dirname(os.path.dirname(_PACKAGE_DIR)), "proto")]
    return [c for c in candidates if os.path.isfile(os.path.join(c, PROTO))]


def _stub_roots() -> List[str]:
    roots = []
    env = os.environ.get("NVFP4CAL_PY_STUBS")
    if env:
        roots.append(env)
    roots.extend(p or os.getcwd() for p in sys.path)
    return roots


def _protoc_version(protoc: str) -> Optional[tuple]:
    try:
        out = subprocess.run([protoc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _run_protoc(protoc: Optional[str], args: List[str]) -> None:
    """protoc with `args`: the binary when given, else grpc_tools' bundled one."""
    if protoc is not None:
        subprocess.run([protoc] + args, check=True, capture_output=True, text=True)
        return
    from grpc_tools import protoc as grpc_tools_protoc  # pylint: disable=import-outside-toplevel
    if grpc_tools_protoc.main(["grpc_tools.protoc"] + args) != 0:
        raise RuntimeError(f"grpc_tools.protoc {' '.join(args)} failed")


def generate(proto_root: str, out: str, protoc: Optional[str] = None) -> None:
    """Writes out/nvfp4cal/v1/calibrator_pb2.py (and calibrator_pb2_grpc.py when grpc_tools is
    installed). `protoc`: a protoc binary (default: `protoc` on PATH when >= 3.15, else
    grpc_tools' own). RuntimeError when no usable protoc exists."""
    if protoc is None:
        found = shutil.which("protoc")
        version = _protoc_version(found) if found else None
        protoc = found if version is not None and version >= (3, 15) else None
    if protoc is None:
        try:
            import grpc_tools  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError:
            raise RuntimeError("no protoc >= 3.15 on PATH and no grpc_tools: " + _HINT) from None
    os.makedirs(os.path.join(out, "nvfp4cal", "v1"), exist_ok=True)
    with tempfile.TemporaryDirectory() as temp:
        descriptor_set = os.path.join(temp, "calibrator.desc")
        _run_protoc(protoc, [f"--proto_path={proto_root}", "--include_imports",
                             f"--descriptor_set_out={descriptor_set}", f"--python_out={out}",
                             PROTO])
        try:
            _run_protoc(None, [f"--descriptor_set_in={descriptor_set}",
                               f"--grpc_python_out={out}", PROTO])
        except ImportError:
            pass  # the service stubs are a convenience; nvfp4cal.Client does not need them


def _attach(root: str):
    """Makes root/nvfp4cal/v1 part of the nvfp4cal.v1 package and imports the message module."""
    import nvfp4cal.v1 as v1  # pylint: disable=import-outside-toplevel
    folder = os.path.join(root, "nvfp4cal", "v1")
    if folder not in v1.__path__:
        v1.__path__.append(folder)
    return importlib.import_module("nvfp4cal.v1.calibrator_pb2")


def _cache_dir(proto_root: str) -> str:
    with open(os.path.join(proto_root, PROTO), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nvfp4cal", f"stubs-{digest}")


def load():
    """The calibrator_pb2 module (see the module docstring). ImportError with instructions
    when the stubs are neither found nor can be generated."""
    if "nvfp4cal.v1.calibrator_pb2" in sys.modules:
        return sys.modules["nvfp4cal.v1.calibrator_pb2"]
    try:
        import google.protobuf  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        raise ImportError("nvfp4cal.Client needs the protobuf package (pip install protobuf, "
                          "Debian: python3-protobuf)") from None
    if os.path.isfile(os.path.join(_PACKAGE_DIR, "v1", "calibrator_pb2.py")):
        return importlib.import_module("nvfp4cal.v1.calibrator_pb2")
    for root in _stub_roots():
        if os.path.isfile(os.path.join(root, "nvfp4cal", "v1", "calibrator_pb2.py")):
            return _attach(root)
    roots = _proto_roots()
    if not roots:
        raise ImportError("the gRPC stubs of nvfp4cal (nvfp4cal/v1/calibrator_pb2.py) were not "
                          "found and no calibrator.proto is at hand to generate them: " + _HINT)
    cache = _cache_dir(roots[0])
    if not os.path.isfile(os.path.join(cache, "nvfp4cal", "v1", "calibrator_pb2.py")):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        temp = tempfile.mkdtemp(prefix=os.path.basename(cache) + ".", dir=os.path.dirname(cache))
        try:
            generate(roots[0], temp)
            os.replace(temp, cache)  # atomic; a concurrent winner leaves ours to remove
        except OSError:
            shutil.rmtree(temp, ignore_errors=True)
        except Exception as error:  # pylint: disable=broad-except
            shutil.rmtree(temp, ignore_errors=True)
            raise ImportError(f"could not generate the gRPC stubs of nvfp4cal: {error}") from None
    return _attach(cache)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Generate nvfp4cal's Python gRPC stubs.")
    parser.add_argument("--proto-root", required=True, help="folder holding nvfp4cal/v1/")
    parser.add_argument("--out", required=True, help="folder to write nvfp4cal/v1/*.py into")
    parser.add_argument("--protoc", help="protoc binary (>= 3.15); default: PATH or grpc_tools")
    args = parser.parse_args(argv)
    try:
        generate(args.proto_root, args.out, args.protoc)
    except (RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or ""
        print(f"nvfp4cal._proto: error: {error} {detail}".strip(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
