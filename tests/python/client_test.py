#!/usr/bin/python3
"""nvfp4cal.Client against loopback nvfp4cal-servers (--device=cpu), byte for byte against
`nvfp4cal quantize` (in-process) for every method, and its errors.

A second server runs with a bearer token, its smallest receive limit and session limits a few
Hessians wide (sessions reopened by the client); its client sends 1 KiB chunks.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

import testlib
import nvfp4cal
from nvfp4cal.hessians_file import read_safetensors, resolve_hessian_entry
from tiny_model import load, make_model, save_checkpoint

METHODS = ("max", "mse", "local_hessian", "dss", "gptq")
FAMILIES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
TOKEN = "python-client-test-token"


def fused_key(module):
    parent, _, leaf = module.rpartition(".")
    for family in FAMILIES:
        if leaf in family:
            return parent + "|" + family[0]
    return module


class ClientTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.temp = tempfile.mkdtemp(prefix="nvfp4cal-py-client-")
        cls.model_dir = os.path.join(cls.temp, "model")
        save_checkpoint(make_model(seed=5), cls.model_dir)
        model = load(cls.model_dir, torch.float32, torch.device("cpu"))
        with nvfp4cal.capture(model, layout="full", verbose=False) as cap, torch.no_grad():
            for seed in range(2):
                model(torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(seed)))
        cls.hessians = os.path.join(cls.temp, "hessians.safetensors")
        cap.save(cls.hessians)
        cls.tensors, _ = read_safetensors(os.path.join(cls.model_dir, "model.safetensors"))
        cls.h_tensors, cls.h_meta = read_safetensors(cls.hessians)
        cls.modules = sorted(cap.modules)
        token_file = os.path.join(cls.temp, "tokens.txt")
        with open(token_file, "w") as f:
            f.write(f"# accepted tokens\n{TOKEN}\n")
        cls.server = testlib.Server()
        cls.addClassCleanup(cls.server.stop)
        cls.strict = testlib.Server(f"--auth_token_file={token_file}",
                                    "--max_receive_message_bytes=65536",
                                    "--max_session_hessian_bytes=12288",
                                    "--max_session_full_hessian_bytes=60000")
        cls.addClassCleanup(cls.strict.stop)
        cls.expected = {m: cls.cli_quantize(m) for m in METHODS}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.temp, ignore_errors=True)

    @classmethod
    def cli_quantize(cls, method):
        out = os.path.join(cls.temp, f"out-{method}")
        done = testlib.run([testlib.cli_binary(), "quantize", "--model", cls.model_dir,
                            "--hessians", cls.hessians, "--out", out, "--method", method,
                            "--device", "cpu", "--quiet"])
        assert done.returncode == 0, done.stderr
        return read_safetensors(os.path.join(out, "model.safetensors"))[0]

    def weight(self, module):
        bits = self.tensors[module + ".weight"].data.view(np.int16).copy()
        return torch.from_numpy(bits).view(torch.bfloat16)

    def group_amax(self):
        amax = {}
        for m in self.modules:
            value = float(self.weight(m).abs().max().float())
            amax[fused_key(m)] = max(amax.get(fused_key(m), 0.0), value)
        return amax

    def hessian(self, module):
        entry = resolve_hessian_entry(module, self.h_tensors, self.h_meta)
        return self.h_tensors[entry].data  # the same numpy object for q/k/v: sent once

    def check_session(self, client, method, **options):
        expected, amax = self.expected[method], self.group_amax()
        with client.session() as session:
            for m in self.modules:
                q = session.quantize(self.weight(m), hessian=self.hessian(m), method=method,
                                     name=m + ".weight", global_amax=amax[fused_key(m)], **options)
                self.assertEqual(q.packed_codes.numpy().tobytes(),
                                 expected[m + ".weight"].data.tobytes(), m)
                self.assertEqual(q.scales.numpy().tobytes(),
                                 expected[m + ".weight_scale"].data.tobytes(), m)
                self.assertEqual(np.float32(q.global_scale),
                                 expected[m + ".weight_scale_2"].data.reshape(()), m)
                self.assertEqual(q.stats["method"], method)
                self.assertEqual(q.stats["num_blocks"], q.rows * q.cols // 16)

    def test_every_method_matches_the_cli_byte_for_byte(self):
        client = nvfp4cal.Client([self.server.address])
        sent = []
        job = sys.modules["nvfp4cal.client"]._Job
        original = job._hessian_chunks

        def counting(self_, full, chunk_bytes):
            sent.append(self_.cols)
            return original(self_, full, chunk_bytes)

        job._hessian_chunks = counting
        try:
            for method in METHODS:
                with self.subTest(method=method):
                    sent.clear()
                    self.check_session(client, method)
                    if method != "max" and method != "mse":
                        entries = {resolve_hessian_entry(m, self.h_tensors, self.h_meta)
                                   for m in self.modules}
                        self.assertEqual(len(sent), len(entries))  # each Hessian sent once
        finally:
            job._hessian_chunks = original
            client.close()

    def test_small_chunks_session_limits_and_token(self):
        with nvfp4cal.Client(self.strict.address, token=TOKEN, chunk_bytes=1024) as client:
            info = client.server_info()
            self.assertEqual(info.limits.max_receive_message_bytes, 65536)
            for method in ("dss", "gptq"):
                with self.subTest(method=method):
                    self.check_session(client, method)
            # gptq with the whole matrix instead of its upper triangle: the same bytes
            self.check_session(client, "gptq", full_hessian_layout="full")

    def test_one_tensor_from_torch_with_a_block_hessian(self):
        m = "model.layers.0.mlp.down_proj"
        h = torch.from_numpy(self.hessian(m).astype(np.float32))
        blocks = torch.stack([h[i:i + 16, i:i + 16] for i in range(0, h.shape[0], 16)])
        q = nvfp4cal.Client([self.server.address]).quantize(self.weight(m), hessian=blocks,
                                                            method="dss")
        self.assertEqual(q.packed_codes.dtype, torch.uint8)
        self.assertEqual(tuple(q.packed_codes.shape), (64, 48))
        self.assertEqual(tuple(q.scales.shape), (64, 6))
        self.assertEqual(q.packed_codes.numpy().tobytes(),
                         self.expected["dss"][m + ".weight"].data.tobytes())
        error = (q.dequantize() - self.weight(m).float()).abs().max()
        self.assertLess(float(error), float(self.weight(m).float().abs().max()) / 4)

    def test_gptq_comparison_is_opt_in_and_changes_no_byte(self):
        m = "model.layers.0.mlp.down_proj"
        w, h = self.weight(m), self.hessian(m)
        with nvfp4cal.Client([self.server.address]) as client:
            plain = client.quantize(w, hessian=h, method="gptq")
            compared = client.quantize(w, hessian=h, method="gptq", compare_local_hessian=True)
            with self.assertRaisesRegex(ValueError, "applies to method gptq only"):
                client.quantize(w, hessian=h, method="dss", compare_local_hessian=True)
        self.assertEqual(plain.packed_codes.numpy().tobytes(),
                         compared.packed_codes.numpy().tobytes())
        self.assertEqual(plain.scales.numpy().tobytes(), compared.scales.numpy().tobytes())
        self.assertEqual(plain.stats["full_hessian_error"], 0.0)
        self.assertEqual(plain.stats["full_hessian_error_local_hessian"], 0.0)
        self.assertFalse(plain.stats["params"].get("compare_local_hessian", False))
        self.assertGreater(compared.stats["full_hessian_error"], 0.0)
        self.assertGreater(compared.stats["full_hessian_error_local_hessian"], 0.0)
        self.assertTrue(compared.stats["params"]["compare_local_hessian"])

    def test_errors_carry_the_status_and_the_message(self):
        w = self.weight("model.layers.0.mlp.down_proj")
        h = self.hessian("model.layers.0.mlp.down_proj")
        client = nvfp4cal.Client([self.server.address])
        with self.assertRaises(nvfp4cal.ServerError) as raised:
            client.quantize(w, hessian=h, method="dss", beta_step=5.0)
        self.assertEqual(raised.exception.code.name, "INVALID_ARGUMENT")
        self.assertIn("beta_step = 5 is out of range", str(raised.exception))
        self.assertIn(self.server.address, str(raised.exception))
        with self.assertRaisesRegex(ValueError, "method 'best' is unknown"):
            client.quantize(w, hessian=h, method="best")
        with self.assertRaisesRegex(ValueError, "needs the full"):
            client.quantize(w, hessian=np.zeros((6, 16, 16), np.float32), method="gptq")
        with self.assertRaisesRegex(ValueError, "applies to method gptq only"):
            client.quantize(w, hessian=h, method="dss", damping=0.1)
        with self.assertRaisesRegex(ValueError, "hessian shape"):
            client.quantize(w, hessian=np.eye(32, dtype=np.float32), method="dss")
        with self.assertRaises(nvfp4cal.ServerError) as raised:
            nvfp4cal.Client(self.strict.address, token="wrong").quantize(w, method="max")
        self.assertEqual(raised.exception.code.name, "UNAUTHENTICATED")
        with self.assertRaises(nvfp4cal.ServerError) as raised:
            nvfp4cal.Client(self.strict.address).quantize(w, method="max")
        self.assertEqual(raised.exception.code.name, "UNAUTHENTICATED")

    def test_server_down_is_unavailable_after_the_retries(self):
        down = testlib.Server()
        address = down.address
        down.stop()
        client = nvfp4cal.Client([address], max_attempts=2)
        with self.assertRaises(nvfp4cal.ServerError) as raised:
            client.quantize(self.weight("model.layers.0.mlp.down_proj"), method="max")
        self.assertEqual(raised.exception.code.name, "UNAVAILABLE")
        # A second address that works: the tensor goes there.
        client = nvfp4cal.Client([address, self.server.address], max_attempts=3)
        q = client.quantize(self.weight("model.layers.0.mlp.down_proj"), method="max")
        self.assertEqual(q.packed_codes.numpy().tobytes(),
                         self.expected["max"]["model.layers.0.mlp.down_proj.weight"].data.tobytes())

    def test_import_needs_no_stubs_and_the_client_generates_them(self):
        cache = os.path.join(self.temp, "cache")
        env = {"PATH": os.environ.get("PATH", ""), "XDG_CACHE_HOME": cache,
               "PYTHONPATH": testlib.PYTHON_DIR, "PYTHONDONTWRITEBYTECODE": "1"}
        script = ("import sys, nvfp4cal; nvfp4cal.capture; "
                  "assert 'grpc' not in sys.modules and 'google.protobuf' not in sys.modules; "
                  "c = nvfp4cal.Client(['127.0.0.1:1']); print(sys.modules['nvfp4cal.v1.calibrator_pb2'].__file__)")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(done.stdout.strip().startswith(os.path.join(cache, "nvfp4cal")),
                        done.stdout)
        # No protoc on PATH (grpc_tools' bundled 3.5 cannot parse `optional`): a clear error.
        env.update(PATH="/nonexistent", XDG_CACHE_HOME=os.path.join(self.temp, "cache2"))
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("ImportError: could not generate the gRPC stubs", done.stderr)


if __name__ == "__main__":
    testlib.main()
