#!/usr/bin/python3
"""`nvfp4cal.finetune_scales` and `python -m nvfp4cal finetune-scales` on the tiny test model and
its NVFP4 checkpoint from `nvfp4cal quantize`: the snap gives E4M3 values only (all 126 and
random inputs, against a port of the C++ EncodeE4M3Scale), zero learning rate gives the input
checkpoint byte for byte, early stopping writes the best validation step's scales, a paused and
resumed run ends with the same bytes as an uninterrupted one, and bad input is one clear error
with nothing written."""

import filecmp
import json
import os
import shutil
import struct
import tempfile
import unittest

import numpy as np

import testlib
import torch
from nvfp4cal.data import ByteTokenizer, make_samples
from nvfp4cal.finetune import (E4M3_VALUES, FinetuneError, _DequantizeScales, _unpacked_codes,
                               e4m3_bytes, e4m3_decode, finetune_scales, read_nvfp4_modules,
                               snap_e4m3)
from tiny_model import load, make_model, save_checkpoint

os.environ["OMP_NUM_THREADS"] = "1"  # the CLI runs below: tiny tensors, no thread contention
torch.set_num_threads(1)

WORDS = ("def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "=",
         "(", ")", ":", "\n", "    ", "0", "1", "print", "value", "+", "*", "#")


def make_text(seed, length=6000):
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=length // 3).tolist())[:length]


def encode_e4m3_scale(x):
    """Port of EncodeE4M3Scale (kernels/include/nvfp4cal/kernels/codecs.h): float32 -> byte."""
    x = np.float32(x)
    if np.isnan(x) or x <= np.float32(2.0 ** -9):
        x = np.float32(2.0 ** -9)
    a = min(x, np.float32(448.0))
    if a >= 448.0:
        return 0x7E
    if a < 0.015625:
        return int(np.rint(np.float32(a * np.float32(512.0))))  # rint: half to even
    bits = int(np.array(a, np.float32).view(np.uint32))
    bits += 0x7FFFF + ((bits >> 20) & 1)
    return min((bits >> 20) - ((127 - 7) << 3), 0x7E)


class SnapTest(unittest.TestCase):

    def test_every_e4m3_value_is_kept_and_ties_go_to_even(self):
        self.assertEqual(E4M3_VALUES.size, 126)
        self.assertEqual(E4M3_VALUES[0], 2.0 ** -9)
        self.assertEqual(E4M3_VALUES[-1], 448.0)
        snapped = snap_e4m3(torch.from_numpy(E4M3_VALUES)).numpy()
        np.testing.assert_array_equal(snapped, E4M3_VALUES)
        np.testing.assert_array_equal(e4m3_bytes(snapped), np.arange(1, 127, dtype=np.uint8))
        np.testing.assert_array_equal(e4m3_decode(np.arange(1, 127)), E4M3_VALUES)
        for byte in range(1, 127):  # the C++ encoder agrees on every value
            self.assertEqual(encode_e4m3_scale(E4M3_VALUES[byte - 1]), byte)
        # Midpoints between neighbours (exact in float32) round to the even byte.
        mid = ((E4M3_VALUES[:-1].astype(np.float64) + E4M3_VALUES[1:]) / 2).astype(np.float32)
        self.assertTrue(np.all(mid.astype(np.float64) == (E4M3_VALUES[:-1].astype(np.float64)
                                                          + E4M3_VALUES[1:]) / 2))
        got = e4m3_bytes(snap_e4m3(torch.from_numpy(mid)).numpy())
        lower = np.arange(1, 126)
        expected = np.where(lower % 2 == 0, lower, lower + 1)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, [encode_e4m3_scale(v) for v in mid])

    def test_random_and_special_inputs_give_e4m3_values_as_the_cpp_encoder(self):
        rng = np.random.default_rng(5)
        values = np.concatenate([
            np.exp2(rng.uniform(-14, 12, 20000)),                        # log-uniform
            rng.uniform(0, 0.03, 2000),                                  # subnormal range
            rng.uniform(400, 500, 1000),                                 # top of the range
            np.nextafter(E4M3_VALUES, np.float32(np.inf)),               # just off each value
            np.nextafter(E4M3_VALUES, np.float32(0)),
            [0.0, -1.0, -0.0, np.inf, -np.inf, np.nan, 2.0 ** -10, 2.0 ** -10 + 1e-7, 464.0,
             1e30, 1e-30]]).astype(np.float32)
        with np.errstate(invalid="ignore"):
            snapped = snap_e4m3(torch.from_numpy(values)).numpy()
        self.assertTrue(np.all(np.isin(snapped, E4M3_VALUES)))          # never 0, never NaN
        expected = np.array([encode_e4m3_scale(v) for v in values], np.uint8)
        np.testing.assert_array_equal(e4m3_bytes(snapped), expected)
        # The nearest value: no E4M3 value is closer (in float64).
        finite = np.isfinite(values) & (values >= 2.0 ** -9) & (values <= 448)
        v = values[finite].astype(np.float64)
        distance = np.abs(E4M3_VALUES[None, :].astype(np.float64) - v[:, None]).min(axis=1)
        np.testing.assert_array_equal(np.abs(snapped[finite] - v), distance)

    def test_the_dequantized_weight_is_the_checkpoint_readers_and_the_gradient_is_straight(self):
        rng = np.random.default_rng(1)
        codes = rng.integers(0, 256, size=(8, 16), dtype=np.uint8)          # [8, 32] weights
        scale_bytes = rng.integers(1, 127, size=(8, 2), dtype=np.uint8)
        s2 = np.float32(0.0137)
        e2m1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6],
                        np.float32)
        nib = np.empty((8, 32), np.uint8)
        nib[:, 0::2], nib[:, 1::2] = codes & 0xF, codes >> 4
        expected = (e2m1[nib] * np.repeat(e4m3_decode(scale_bytes), 16, axis=1)) * s2
        log_scale = torch.tensor(np.log(e4m3_decode(scale_bytes)), requires_grad=True)
        weight = _DequantizeScales.apply(log_scale, torch.from_numpy(_unpacked_codes(codes)),
                                         torch.tensor(s2), torch.float32)
        np.testing.assert_array_equal(weight.detach().numpy(), expected.astype(np.float32))
        grad = torch.from_numpy(rng.standard_normal((8, 32)).astype(np.float32))
        weight.backward(grad)
        straight = ((grad.numpy() * e2m1[nib]).reshape(8, 2, 16).sum(-1) * s2
                    * np.exp(log_scale.detach().numpy()))
        np.testing.assert_allclose(log_scale.grad.numpy(), straight, rtol=1e-5, atol=1e-7)


class FinetuneTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.temp = tempfile.mkdtemp(prefix="nvfp4cal-py-finetune-")
        cls.model_dir = os.path.join(cls.temp, "model")
        save_checkpoint(make_model(seed=9), cls.model_dir)
        cls.checkpoint = os.path.join(cls.temp, "nvfp4")
        done = testlib.run([testlib.cli_binary(), "quantize", "--model", cls.model_dir,
                            "--out", cls.checkpoint, "--method", "max", "--device", "cpu",
                            "--quiet"])
        assert done.returncode == 0, done.stderr
        cls.text = os.path.join(cls.temp, "calib.txt")
        with open(cls.text, "w") as f:
            f.write(make_text(0))
        docs = [ByteTokenizer().encode(make_text(0))]
        windows = make_samples(docs, 32, 40, seed=0)
        cls.train, cls.val = windows[:32], windows[32:]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.temp, ignore_errors=True)

    def model(self):
        return load(self.model_dir, torch.float32, "cpu")

    def fresh(self):
        return tempfile.mkdtemp(dir=self.temp)

    def cli(self, out, *extra, model=None, checkpoint=None, data=None, loader="tiny_model:load"):
        args = ["finetune-scales", "--model", model or self.model_dir, "--checkpoint",
                checkpoint or self.checkpoint, "--data", data or self.text, "--out", out,
                "--model-loader", loader, "--tokenizer", "bytes", "--seq-len", "32",
                "--samples", "24", "--val-samples", "8", "--batch", "4", "--device", "cpu",
                "--dtype", "fp32", "--quiet"]
        return testlib.run_python_cli(*(args + list(extra)))

    def test_zero_learning_rate_gives_the_input_checkpoint_byte_for_byte(self):
        out = os.path.join(self.fresh(), "ft")
        done = self.cli(out, "--lr", "0", "--steps", "6", "--eval-every", "3")
        self.assertEqual(done.returncode, 0, done.stderr)
        compare = filecmp.dircmp(self.checkpoint, out)
        self.assertEqual(sorted(os.listdir(out)), sorted(os.listdir(self.checkpoint)))
        for name in os.listdir(out):
            self.assertTrue(filecmp.cmp(os.path.join(self.checkpoint, name),
                                        os.path.join(out, name), shallow=False), name)
        self.assertFalse(compare.diff_files)
        self.assertEqual(os.stat(out).st_mode, os.stat(self.checkpoint).st_mode)
        with open(out + ".finetune.json") as f:
            stats = json.load(f)
        self.assertEqual(stats["scales_moved"], 0)
        self.assertEqual(stats["steps_run"], 6)
        self.assertEqual(sorted(os.listdir(os.path.dirname(out))), ["ft", "ft.finetune.json"])

    def test_training_moves_scales_and_changes_only_scale_bytes(self):
        out = os.path.join(self.fresh(), "ft")
        model = self.model()
        params = [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]
        reference = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = finetune_scales(model, self.checkpoint, self.train, self.val, out=out,
                                 steps=10, eval_every=5, batch_size=4, lr=1e-2)
        # The model is given back as it came: same Parameters, order, flags and values.
        self.assertEqual([(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
                         params)
        for n, p in model.named_parameters():
            self.assertTrue(torch.equal(p, reference[n]), n)
        self.assertNotIn("weight", model.model.layers[0].mlp.up_proj.__dict__)
        self.assertGreater(result.stats["scales_moved"], 0)
        self.assertLess(result.stats["best_val_kl"], result.stats["initial_val_kl"])
        before = read_nvfp4_modules(self.checkpoint)
        after = read_nvfp4_modules(out)
        with open(os.path.join(self.checkpoint, "model.safetensors"), "rb") as f:
            old = f.read()
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            new = f.read()
        self.assertEqual(len(old), len(new))
        changed = np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8))
        scale_ranges = [(m.scale_offset, m.scale_offset + m.scale_bytes.size)
                        for m in before.values()]
        self.assertTrue(all(any(b <= c < e for b, e in scale_ranges) for c in changed))
        self.assertEqual(changed.size, result.stats["scales_moved"])
        for name, module in after.items():
            self.assertTrue(np.all((module.scale_bytes >= 1) & (module.scale_bytes <= 0x7E)))
            np.testing.assert_array_equal(module.codes, before[name].codes)
            np.testing.assert_array_equal(module.scale_bytes, result.scale_bytes[name])

    def test_early_stopping_writes_the_best_validation_step(self):
        seen = []
        out = os.path.join(self.fresh(), "ft")
        # The constructed case: 16 training windows, lr 1e-2: the validation loss falls, then
        # rises again at the end (best at step 36 of 40 here: 0.0692, then 0.0710).
        train = self.train[:16]
        result = finetune_scales(self.model(), self.checkpoint, train, self.val, out=out,
                                 steps=40, eval_every=4, batch_size=4, lr=1e-2,
                                 on_eval=lambda step, loss, b: seen.append((step, loss, b)))
        losses = [loss for _, loss, _ in seen]
        best = int(np.argmin(losses))
        self.assertTrue(0 < best < len(seen) - 1, [(s, round(v, 5)) for s, v, _ in seen])
        self.assertEqual(result.stats["best_step"], seen[best][0])
        self.assertEqual(result.stats["best_val_kl"], losses[best])
        written = read_nvfp4_modules(out)
        for name, data in seen[best][2].items():
            np.testing.assert_array_equal(written[name].scale_bytes, data)
        self.assertTrue(any(not np.array_equal(seen[-1][2][n], seen[best][2][n])
                            for n in written))
        # patience: stop after the first evaluation that does not improve on the best.
        first_worse = next(i for i in range(1, len(losses)) if losses[i] >= min(losses[:i]))
        stopped = finetune_scales(self.model(), self.checkpoint, train, self.val,
                                  steps=40, eval_every=4, batch_size=4, lr=1e-2, patience=1)
        self.assertTrue(stopped.stats["stopped_early"])
        self.assertEqual(stopped.stats["steps_run"], seen[first_worse][0])
        self.assertEqual(stopped.stats["best_step"], seen[int(np.argmin(losses[:first_worse]))][0])

    def test_a_paused_run_resumes_to_the_same_bytes(self):
        parent = self.fresh()
        straight, paused = os.path.join(parent, "straight"), os.path.join(parent, "paused")
        options = ("--steps", "12", "--eval-every", "4", "--lr", "2e-2", "--seed", "3")
        done = self.cli(straight, *options)
        self.assertEqual(done.returncode, 0, done.stderr)
        done = self.cli(paused, *options, "--stop-at", "6")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertFalse(os.path.exists(paused))
        resume_file = paused + ".finetune-resume.safetensors"
        self.assertTrue(os.path.isfile(resume_file))
        done = self.cli(paused, *options)  # without --resume: refused
        self.assertEqual(done.returncode, 1)
        self.assertIn("pass --resume", done.stderr)
        done = self.cli(paused, *options[:-1], "4", "--resume")  # another seed: another run
        self.assertEqual(done.returncode, 1)
        self.assertIn("belongs to another run", done.stderr)
        done = self.cli(paused, *options, "--resume")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertFalse(os.path.exists(resume_file))
        for name in os.listdir(straight):
            self.assertTrue(filecmp.cmp(os.path.join(straight, name),
                                        os.path.join(paused, name), shallow=False), name)
        stats = []
        for folder in (straight, paused):
            with open(folder + ".finetune.json") as f:
                stats.append(json.load(f))
        self.assertGreater(stats[0]["scales_moved"], 0)
        self.assertEqual(stats[0]["evaluations"], stats[1]["evaluations"])
        self.assertEqual(stats[0]["best_step"], stats[1]["best_step"])

    def assert_fails(self, message, *extra, **kwargs):
        parent = self.fresh()
        done = self.cli(os.path.join(parent, "ft"), "--steps", "2", *extra, **kwargs)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertTrue(done.stderr.startswith("nvfp4cal finetune-scales: error: "), done.stderr)
        self.assertEqual(done.stderr.count("error:"), 1, done.stderr)
        self.assertIn(message, done.stderr)
        self.assertEqual(os.listdir(parent), [])  # nothing written

    def test_bad_input_is_one_clear_error_and_writes_nothing(self):
        other = os.path.join(self.temp, "other-shape")
        config = dict(make_model().config, hidden_size=32)
        model = make_model()
        model.config = config
        os.makedirs(other, exist_ok=True)
        with open(os.path.join(other, "config.json"), "w") as f:
            json.dump(config, f)
        from tiny_model import TinyLlama  # pylint: disable=import-outside-toplevel
        save_checkpoint(TinyLlama(config).eval(), other)
        same_shape = os.path.join(self.temp, "other-weights")
        save_checkpoint(make_model(seed=10), same_shape)
        empty = os.path.join(self.temp, "empty.txt")
        open(empty, "w").close()
        short = os.path.join(self.temp, "short.txt")
        with open(short, "w") as f:
            f.write("x = 1\n")
        self.assert_fails("no NVFP4 modules", checkpoint=self.model_dir)
        self.assert_fails("weight, the model's is [", model=other)
        self.assert_fails("is not a quantization of the model's", model=same_shape)
        self.assert_fails("is no torch.nn.Linear of the model",
                          loader="tiny_model:load_without_linear")
        self.assert_fails("no tokens", data=empty)
        self.assert_fails("at least 2 are needed", data=short)
        self.assert_fails("must not be, contain or lie inside the input", checkpoint=self.temp)
        self.assert_fails("--lr = -1.0 must be finite and >= 0", "--lr", "-1")
        # A checkpoint whose shard is not safetensors; an --out that exists.
        broken = os.path.join(self.temp, "broken")
        os.makedirs(broken, exist_ok=True)
        with open(os.path.join(broken, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", 4) + b"{{{{")
        self.assert_fails("not a safetensors file", checkpoint=broken)
        parent = self.fresh()
        existing = os.path.join(parent, "ft")
        os.makedirs(existing)
        with open(os.path.join(existing, "mine.txt"), "w") as f:
            f.write("keep me")
        done = self.cli(existing, "--steps", "2")
        self.assertEqual(done.returncode, 1)
        self.assertIn("already exists; pass --overwrite", done.stderr)
        done = self.cli(existing, "--steps", "2", "--overwrite")
        self.assertEqual(done.returncode, 1)
        self.assertIn("neither empty nor an nvfp4cal checkpoint", done.stderr)
        self.assertEqual(os.listdir(parent), ["ft"])
        self.assertEqual(os.listdir(existing), ["mine.txt"])
        with self.assertRaisesRegex(FinetuneError, "no training data"):
            finetune_scales(self.model(), self.checkpoint, [], self.val)


if __name__ == "__main__":
    testlib.main()
