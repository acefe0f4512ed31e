"""nvfp4cal.v1: the Python stubs generated from proto/nvfp4cal/v1/calibrator.proto.

Nothing is checked in here: the generated modules live in `build/python/nvfp4cal/v1` (CMake),
in this folder (`pip install`), or in a cache folder (nvfp4cal._proto). `extend_path` makes
every `nvfp4cal/v1` folder on sys.path part of this package, so that
`PYTHONPATH=python:build/python` finds the CMake build's stubs.
"""
import pkgutil

__path__ = pkgutil.extend_path(__path__, __name__)
