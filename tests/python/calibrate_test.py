#!/usr/bin/python3
"""`python -m nvfp4cal calibrate` and `calibrate-quantize` on the tiny test model (loaded with
--model-loader: no transformers here): data formats, deterministic samples, the file accepted by
`nvfp4cal quantize`, and bad input giving one clear error line with nothing written."""

import json
import os
import shutil
import tempfile
import unittest

import numpy as np

import testlib
from nvfp4cal.hessians_file import read_safetensors
from tiny_model import make_model, save_checkpoint

TEXT = ("def f(x):\n    return x * 2  # calibration text, byte by byte\n" * 40)


class CalibrateTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.temp = tempfile.mkdtemp(prefix="nvfp4cal-py-calibrate-")
        cls.model_dir = os.path.join(cls.temp, "model")
        save_checkpoint(make_model(seed=9), cls.model_dir)
        cls.text = cls.write("calib.txt", TEXT)
        cls.jsonl = cls.write("calib.jsonl", "\n".join(
            json.dumps({"text": t}) for t in ("short one", "x = 1\n" * 20, "héllo wörld")))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.temp, ignore_errors=True)

    @classmethod
    def write(cls, name, content, mode="w"):
        path = os.path.join(cls.temp, name)
        with open(path, mode) as f:
            f.write(content)
        return path

    def calibrate(self, *extra, out=None, loader="tiny_model:load", data=None):
        out = out or os.path.join(tempfile.mkdtemp(dir=self.temp), "h.safetensors")
        args = ["calibrate", "--model", self.model_dir, "--model-loader", loader,
                "--out", out, "--device", "cpu", "--dtype", "fp32", "--tokenizer", "bytes",
                "--seq-len", "32", "--samples", "6", "--batch", "4", "--quiet"]
        for path in data or [self.text]:
            args += ["--data", path]
        return testlib.run_python_cli(*(args + list(extra))), out

    def assert_fails(self, message, *extra, code=1, **kwargs):
        done, out = self.calibrate(*extra, **kwargs)
        self.assertEqual(done.returncode, code, done.stderr)
        self.assertIn(message, done.stderr)
        if code == 1:
            self.assertEqual(done.stderr.count("error:"), 1, done.stderr)
            self.assertTrue(done.stderr.startswith("nvfp4cal calibrate: error: "), done.stderr)
        self.assertEqual(os.listdir(os.path.dirname(out)), [])  # nothing written

    def test_text_file_gives_a_file_quantize_accepts(self):
        done, out = self.calibrate()
        self.assertEqual(done.returncode, 0, done.stderr)
        tensors, meta = read_safetensors(out)
        self.assertEqual(meta["nvfp4cal.tokens"], str(6 * 32))
        self.assertEqual(meta["nvfp4cal.layout"], "block")
        self.assertEqual(json.loads(meta["nvfp4cal.calibration"])["samples"], 6)
        self.assertEqual(len([n for n in tensors if n.endswith(".hessian")]), 8)
        result = testlib.run([testlib.cli_binary(), "quantize", "--model", self.model_dir,
                              "--hessians", out, "--out", os.path.join(os.path.dirname(out), "q"),
                              "--device", "cpu", "--kv-cache", "fp8", "--quiet"])
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_same_seed_same_file_other_seed_other_file(self):
        files = []
        for seed in ("1", "1", "2"):
            done, out = self.calibrate("--seed", seed, "--samples", "4")
            self.assertEqual(done.returncode, 0, done.stderr)
            with open(out, "rb") as f:
                files.append(f.read())
        self.assertEqual(files[0], files[1])
        self.assertNotEqual(files[0], files[2])

    def test_jsonl_npy_and_bin_data_with_padding_masked(self):
        ids = np.frombuffer(TEXT.encode(), np.uint8)
        npy = os.path.join(self.temp, "ids.npy")
        np.save(npy, ids.astype(np.int32))
        binary = self.write("ids.bin", ids.astype("<u2").tobytes(), "wb")
        done, out = self.calibrate("--layout", "full", "--samples", "1000",
                                   "--token-dtype", "uint16", data=[self.jsonl, npy, binary])
        self.assertEqual(done.returncode, 0, done.stderr)
        tensors, meta = read_safetensors(out)
        windows = 2 * (len(TEXT) // 32)
        # "x = 1\n" * 20 is 120 tokens: 3 windows of 32; the two short texts are padded.
        jsonl_tokens = len("short one") + 3 * 32 + len("héllo wörld".encode())
        self.assertEqual(meta["nvfp4cal.tokens"], str(windows * 32 + jsonl_tokens))
        self.assertEqual(tensors["model.layers.0.self_attn.q_proj.hessian"].shape, (64, 64))

    def test_calibrate_quantize_runs_the_cli(self):
        out = os.path.join(tempfile.mkdtemp(dir=self.temp), "nvfp4")
        done = testlib.run_python_cli(
            "calibrate-quantize", "--model", self.model_dir, "--model-loader", "tiny_model:load",
            "--data", self.text, "--out", out, "--device", "cpu", "--dtype", "fp32",
            "--tokenizer", "bytes", "--seq-len", "32", "--samples", "4", "--method", "gptq",
            "--nvfp4cal", testlib.cli_binary(), "--kv-cache", "fp8", "--quiet")
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(os.path.join(out, "hf_quant_config.json")) as f:
            self.assertEqual(json.load(f)["quantization"]["kv_cache_quant_algo"], "FP8")
        self.assertEqual(sorted(os.listdir(os.path.dirname(out))), ["nvfp4"])  # no leftovers

    def test_bad_input_is_one_clear_error_and_writes_nothing(self):
        empty = self.write("empty.txt", "")
        no_text = self.write("bad.jsonl", json.dumps({"content": "x"}) + "\n")
        big = os.path.join(self.temp, "big.npy")
        np.save(big, np.array([1, 2, 300], dtype=np.int64))
        missing = os.path.join(self.temp, "missing.txt")
        self.assert_fails(f"--data {missing}: no such file", data=[missing])
        self.assert_fails(f"--data {empty}: no tokens", data=[empty])
        self.assert_fails("line 1 has no string field \"text\"", data=[no_text])
        self.assert_fails("token id 300 >= the model's vocab_size 256", data=[big])
        self.assert_fails("needs --token-dtype", data=[self.write("raw.bin", b"\0\1", "wb")])
        self.assert_fails("--seq-len 65 is above the model's max_position_embeddings 64",
                          "--seq-len", "65")
        self.assert_fails("has no torch.nn.Linear layers", loader="tiny_model:load_without_linear")
        self.assert_fails("invalid choice: 'best'", "--method", "best", code=2)
        self.assert_fails("--method gptq needs --layout full", "--method", "gptq",
                          "--layout", "block")
        self.assert_fails("--samples = 0 must be >= 1", "--samples", "0")
        existing = self.write("exists.safetensors", "keep me")
        done, _ = self.calibrate(out=existing)
        self.assertEqual(done.returncode, 1)
        self.assertIn("already exists; pass --overwrite", done.stderr)
        with open(existing) as f:
            self.assertEqual(f.read(), "keep me")

    def test_hugging_face_models_need_transformers(self):
        try:
            import transformers  # noqa: F401  pylint: disable=import-outside-toplevel
            self.skipTest("transformers is installed")
        except ImportError:
            pass
        self.assert_fails("needs transformers: pip install 'nvfp4cal[hf]'", loader="")


if __name__ == "__main__":
    testlib.main()
