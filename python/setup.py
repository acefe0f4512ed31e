"""setuptools hook: ships calibrator.proto in the package and generates the gRPC stubs into
it at build time when a protoc (>= 3.15) or grpc_tools is available. Without one the package
still installs; nvfp4cal.Client then generates the stubs into a cache folder on first use
(nvfp4cal/_proto.py), or says how to get them."""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join("nvfp4cal", "v1", "calibrator.proto")


def _proto_module():
    spec = importlib.util.spec_from_file_location(
        "nvfp4cal_proto_build", os.path.join(HERE, "nvfp4cal", "_proto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        package = os.path.join(self.build_lib, "nvfp4cal")
        source_root = os.path.join(os.path.dirname(HERE), "proto")
        if not os.path.isfile(os.path.join(source_root, PROTO)):
            source_root = os.path.join(HERE, "nvfp4cal", "proto")  # an sdist carries it
        if not os.path.isfile(os.path.join(source_root, PROTO)):
            print("warning: calibrator.proto not found; nvfp4cal.Client will need "
                  "NVFP4CAL_PY_STUBS")
            return
        shipped = os.path.join(package, "proto", os.path.dirname(PROTO))
        os.makedirs(shipped, exist_ok=True)
        shutil.copy(os.path.join(source_root, PROTO), shipped)
        try:
            _proto_module().generate(source_root, self.build_lib)
        except Exception as error:  # pylint: disable=broad-except
            print(f"warning: gRPC stubs not generated at install time ({error}); "
                  "nvfp4cal.Client generates them on first use")


setup(cmdclass={"build_py": BuildPyWithStubs})
