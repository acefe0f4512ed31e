#!/usr/bin/python3
"""The Python capture's Hessians file against the C++ HessianAccumulator's.

The same activations (recorded by test hooks, padding masked) go to nvfp4cal.capture (fp64
accumulation) and to write_hessians_tool (HessianAccumulator + WriteHessiansFile). Both files
must be accepted by `nvfp4cal quantize` and give byte-identical checkpoints, for dss (block
layout) and gptq (full layout), W4A4 with FP8 KV-cache scales (input and output amax used).
The Hessians themselves agree within one fp32 rounding (both sum in fp64, in different orders).
"""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

import numpy as np
import torch

import testlib
import nvfp4cal
from nvfp4cal.hessians_file import read_safetensors, write_hessians
from capture_test import InputRecorder
from tiny_model import load, make_model, save_checkpoint


class HessiansFileTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.temp = tempfile.mkdtemp(prefix="nvfp4cal-py-hessians-")
        cls.model_dir = os.path.join(cls.temp, "model")
        save_checkpoint(make_model(seed=3), cls.model_dir)
        cls.model = load(cls.model_dir, torch.float32, torch.device("cpu"))
        g = torch.Generator().manual_seed(7)
        cls.batches = [torch.randint(0, 256, (3, 16), generator=g) for _ in range(3)]
        cls.masks = [torch.ones(3, 16, dtype=torch.int64) for _ in range(3)]
        cls.masks[0][1, 10:] = 0
        cls.masks[2][0, 3:] = 0

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.temp, ignore_errors=True)

    def files(self, layout):
        """(python file, C++ file) from the same activations."""
        recorder = InputRecorder(self.model)
        with nvfp4cal.capture(self.model, layout=layout, dtype=torch.float64,
                              verbose=False) as cap, torch.no_grad():
            for ids, mask in zip(self.batches, self.masks):
                cap.set_mask(mask)
                recorder.mask = mask
                self.model(ids, attention_mask=mask)
        recorder.remove()
        folder = tempfile.mkdtemp(dir=self.temp)
        py_file = os.path.join(folder, "python.safetensors")
        cap.save(py_file)
        lines = []
        for leader, members in cap.groups().items():
            raw = os.path.join(folder, leader + ".f32")
            np.concatenate(recorder.inputs[leader]).astype(np.float32).tofile(raw)
            n = cap.modules[leader].in_features
            lines.append(f"hessian {leader}.hessian {n} {int(layout == 'full')} {raw}")
            lines += [f"alias {m}.hessian {leader}.hessian" for m in members[1:]]
        lines += [f"output_amax {m} {v!r}" for m, v in cap.output_amax().items()]
        spec = os.path.join(folder, "spec.txt")
        with open(spec, "w") as f:
            f.write("\n".join(lines) + "\n")
        cc_file = os.path.join(folder, "cc.safetensors")
        done = subprocess.run([testlib.ARGS.tool, spec, cc_file], capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        return py_file, cc_file

    def quantize(self, hessians, method):
        out = tempfile.mkdtemp(dir=self.temp)
        os.rmdir(out)
        done = testlib.run([testlib.cli_binary(), "quantize", "--model", self.model_dir,
                            "--hessians", hessians, "--out", out, "--method", method,
                            "--kv-cache", "fp8", "--device", "cpu", "--quiet"])
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(os.path.join(out, "hf_quant_config.json")) as f:
            label = json.load(f)["quantization"]
        self.assertEqual((label["quant_algo"], label["kv_cache_quant_algo"]), ("NVFP4", "FP8"))
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            return f.read()

    def test_quantize_gives_the_same_checkpoint_as_with_the_cc_writer(self):
        for layout, method in (("block", "dss"), ("full", "gptq")):
            with self.subTest(layout=layout, method=method):
                py_file, cc_file = self.files(layout)
                py, py_meta = read_safetensors(py_file)
                cc, cc_meta = read_safetensors(cc_file)
                self.assertEqual(sorted(py), sorted(cc))
                for name in py:
                    a = py[name].data.astype(np.float64)
                    b = cc[name].data.astype(np.float64)
                    self.assertEqual(py[name].shape, cc[name].shape, name)
                    np.testing.assert_allclose(a, b, rtol=2.0 ** -23, atol=0, err_msg=name)
                aliases = {k: v for k, v in cc_meta.items() if not k.startswith("tokens.")}
                self.assertEqual({k: py_meta[k] for k in aliases}, aliases)
                self.assertEqual({k: v for k, v in py_meta.items() if k.startswith("tokens.")},
                                 {k: v for k, v in cc_meta.items() if k.startswith("tokens.")})
                self.assertEqual(self.quantize(py_file, method), self.quantize(cc_file, method))

    def test_bad_aliases_write_nothing(self):
        path = os.path.join(self.temp, "bad.safetensors")
        h = np.eye(16, dtype=np.float32)
        cases = [({"a.k_proj.hessian": "a.q_proj.hessian"}, "not one of the Hessians written"),
                 ({"a.x.hessian": "a.x.hessian"}, "also the name of a Hessian")]
        for aliases, message in cases:
            with self.subTest(aliases=aliases):
                with self.assertRaisesRegex(ValueError, message):
                    write_hessians(path, {"a.x.hessian": h}, aliases=aliases)
                self.assertFalse(os.path.exists(path))
                self.assertEqual([f for f in os.listdir(self.temp) if "bad" in f], [])
        with self.assertRaisesRegex(ValueError, "non-finite"):
            write_hessians(path, {"a.x.hessian": h * np.float32("nan")})
        self.assertFalse(os.path.exists(path))


if __name__ == "__main__":
    testlib.main()
