#!/usr/bin/python3
"""Sequential calibration (nvfp4cal.calibrate_sequential, `--sequential`) on the 2-layer tiny
model against a loopback nvfp4cal-server (--device=cpu).

What is checked, and how:
- layer 0's Hessians equal the static capture's (same inputs; within 1e-6 x max |H|);
- layer 1's Hessians equal X^T X / T of layer 1's Linear inputs recorded by plain forward hooks
  (numpy, fp64) in a model whose layer 0 holds the weights that the C++ `nvfp4cal quantize`
  (from the run's Hessians file, layer 0 only) + `nvfp4cal dequantize --dtype float32` give;
  tolerance 2e-6 x max |H| (fp32 accumulation, as python_capture); those weights are also
  bit-identical to what the run put into the model;
- the final checkpoint (`nvfp4cal quantize` on the original checkpoint with the run's Hessians)
  holds, byte for byte, the codes and scales the client got during the run, for every module;
- static and sequential Hessians differ for layer 1;
- a model whose layers take only hidden states, and a module outside the decoder layers
  (lm_head, captured after them), by hand the same way;
- the CLI (`calibrate-quantize --sequential` with a local server found beside `nvfp4cal`), and
  bad input: server down, options without --sequential, missing server binary, too little
  memory, no decoder layers; nothing written.
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest

import numpy as np
import torch

import testlib
import nvfp4cal
from nvfp4cal import cli as nvfp4cal_cli
from nvfp4cal.hessians_file import read_safetensors, resolve_hessian_entry
from tiny_model import load, make_model, save_checkpoint

TEXT = ("def f(x):\n    return x * 2  # calibration text, byte by byte\n" * 40)
FP32_TOLERANCE = 2e-6   # x max |H|: fp32 accumulation against numpy fp64 (as python_capture)


def make_batches(seed=3, count=3, batch=4, seq=24):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        ids = torch.randint(0, 256, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[k % batch, seq - 5 - k:] = 0  # right padding, left out of the Hessians
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class Recorder:
    """Plain forward pre-hooks keeping the (unmasked) input rows of the named Linear modules."""

    def __init__(self, model, names):
        self.rows = {n: [] for n in names}
        self.mask = None
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_pre_hook(self.hook(n)) for n in names]

    def hook(self, name):
        def record(_module, args):
            x = args[0].detach().double().numpy()
            x = x.reshape(-1, x.shape[-1])
            if self.mask is not None and x.shape[0] == self.mask.numel():
                x = x[self.mask.reshape(-1).bool().numpy()]
            self.rows[name].append(x)
        return record

    def hessian(self, name):
        x = np.concatenate(self.rows[name])
        return x.T @ x / x.shape[0]

    def remove(self):
        for h in self.handles:
            h.remove()


def record_inputs(model, batches, names, forward=None):
    rec = Recorder(model, names)
    with torch.no_grad():
        for b in batches:
            rec.mask = b["attention_mask"] if isinstance(b, dict) else None
            if forward is not None:
                forward(model, b)
            else:
                model(**b)
    rec.remove()
    return rec


def blocks_of(h):
    j = h.shape[0] // 16
    return np.stack([h[16 * b:16 * b + 16, 16 * b:16 * b + 16] for b in range(j)])


def linear_names(model, prefix):
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]


class SimpleModel(torch.nn.Module):
    """Layers that take only the hidden states; an lm_head outside them."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(32, 64)
            self.fc2 = torch.nn.Linear(64, 32, bias=False)

        def forward(self, x):
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 32)
        self.blocks = torch.nn.ModuleList(SimpleModel.Block() for _ in range(3))
        self.lm_head = torch.nn.Linear(32, 256, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def assert_close(test, got, want, tolerance, what):
    error = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
    test.assertLessEqual(error, tolerance, what)


class SequentialTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.temp = tempfile.mkdtemp(prefix="nvfp4cal-py-sequential-")
        cls.model_dir = os.path.join(cls.temp, "model")
        save_checkpoint(make_model(seed=5), cls.model_dir)
        cls.server = testlib.Server()
        cls.addClassCleanup(cls.server.stop)
        cls.batches = make_batches()
        cls.model = load(cls.model_dir, torch.float32, torch.device("cpu"))
        with nvfp4cal.Client([cls.server.address]) as client:
            cls.result = nvfp4cal.calibrate_sequential(cls.model, cls.batches, client,
                                                       method="gptq", keep_quantized=True,
                                                       verbose=False)
        cls.hessians = os.path.join(cls.temp, "sequential.safetensors")
        cls.result.save(cls.hessians)
        static_model = load(cls.model_dir, torch.float32, torch.device("cpu"))
        with nvfp4cal.capture(static_model, layout="full", verbose=False) as cap, torch.no_grad():
            for b in cls.batches:
                cap.set_mask(b["attention_mask"])
                static_model(**b)
        cls.static = cap

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.temp, ignore_errors=True)

    def cli(self, *args):
        done = testlib.run([testlib.cli_binary()] + [str(a) for a in args])
        self.assertEqual(done.returncode, 0, done.stderr)

    def checkpoint(self, folder):
        return read_safetensors(os.path.join(folder, "model.safetensors"))[0]

    def test_the_file_names_every_module(self):
        tensors, meta = read_safetensors(self.hessians)
        self.assertEqual(json.loads(meta["nvfp4cal.sequential"])["layers"], "model.layers")
        self.assertEqual(meta["nvfp4cal.layout"], "full")
        modules = sorted(self.static.modules)
        self.assertEqual(sorted(self.result.modules), modules)
        for m in modules:  # the sharing rule resolves every module, q/k/v and gate/up shared
            self.assertIsNotNone(resolve_hessian_entry(m, tensors, meta), m)
        self.assertEqual(len([n for n in tensors if n.endswith(".hessian")]), 8)
        tokens = sum(int(b["attention_mask"].sum()) for b in self.batches)
        self.assertEqual(meta["nvfp4cal.tokens"], str(tokens))
        self.assertIn("model.layers.1.self_attn.k_proj.output_amax", tensors)

    def test_layer_0_equals_the_static_capture(self):
        for m in linear_names(self.model, "model.layers.0."):
            want = self.static.hessian(m).numpy().astype(np.float64)
            assert_close(self, self.result.hessian(m), want, 1e-6, m)
            self.assertEqual(self.result.input_amax[resolve_hessian_entry(
                m, self.result.hessians, self.result.aliases)], self.static.input_amax(m))

    def test_layer_1_equals_the_hand_computed_hessian(self):
        # Layer 0 quantized and dequantized by the C++ CLI from the run's Hessians file.
        q_dir, dq_dir = os.path.join(self.temp, "q-layer0"), os.path.join(self.temp, "dq-layer0")
        self.cli("quantize", "--model", self.model_dir, "--hessians", self.hessians,
                 "--out", q_dir, "--method", "gptq", "--device", "cpu",
                 "--include", "model.layers.0.*", "--quiet")
        self.cli("dequantize", "--in", q_dir, "--out", dq_dir, "--dtype", "float32")
        dequantized = self.checkpoint(dq_dir)
        hand = load(self.model_dir, torch.float32, torch.device("cpu"))
        modules = dict(hand.named_modules())
        run_modules = dict(self.model.named_modules())
        with torch.no_grad():
            for m in linear_names(hand, "model.layers.0."):
                raw = dequantized[m + ".weight"]
                self.assertEqual(raw.dtype, "F32", m)
                w = torch.from_numpy(raw.data.copy())
                modules[m].weight.copy_(w)
                # what the run replaced the weight with: the same bits
                self.assertTrue(torch.equal(run_modules[m].weight, w), m)
        layer1 = linear_names(hand, "model.layers.1.")
        rec = record_inputs(hand, self.batches, layer1)
        for m in layer1:
            want = rec.hessian(m)
            assert_close(self, self.result.hessian(m), want, FP32_TOLERANCE, m)
        # ... and not the static one: layer 1 saw layer 0's quantization errors.
        for m in layer1:
            static = self.static.hessian(m).numpy().astype(np.float64)
            error = np.abs(self.result.hessian(m) - static).max() / np.abs(static).max()
            self.assertGreater(error, 1e-3, m)

    def test_the_final_checkpoint_holds_the_codes_the_run_used(self):
        out = os.path.join(self.temp, "q-all")
        self.cli("quantize", "--model", self.model_dir, "--hessians", self.hessians,
                 "--out", out, "--method", "gptq", "--device", "cpu", "--quiet")
        tensors = self.checkpoint(out)
        self.assertEqual(sorted(self.result.quantized), sorted(self.static.modules))
        for m, q in self.result.quantized.items():
            self.assertEqual(q.packed_codes.numpy().tobytes(),
                             tensors[m + ".weight"].data.tobytes(), m)
            self.assertEqual(q.scales.numpy().tobytes(),
                             tensors[m + ".weight_scale"].data.tobytes(), m)
            self.assertEqual(np.float32(q.global_scale),
                             tensors[m + ".weight_scale_2"].data.reshape(()), m)

    def test_layers_of_hidden_states_only_and_a_module_after_them(self):
        torch.manual_seed(1)
        model = SimpleModel().eval()
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        ids = [torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(s))
               for s in range(2)]
        static = nvfp4cal.capture(model, layout="block", default_excludes=False, verbose=False)
        with static, torch.no_grad():
            for x in ids:
                model(x)
        result = nvfp4cal.calibrate_sequential(
            model, ids, [self.server.address], method="dss", default_excludes=False,
            keep_quantized=True, restore_weights=True, verbose=False)
        for n, p in model.named_parameters():  # restore_weights: the originals are back
            self.assertTrue(torch.equal(p, original[n]), n)
        for m in ("blocks.0.fc1", "blocks.0.fc2"):
            self.assertEqual(result.hessian(m).shape, (2 if m.endswith("1") else 4, 16, 16))
            assert_close(self, result.hessian(m), static.hessian(m).numpy(), 1e-6, m)
        # By hand: block 2's inputs with blocks 0 and 1 holding the client's dequantized codes
        # (block 2 its own weights), lm_head's (captured after the blocks) with all three.
        def replace(prefix):
            with torch.no_grad():
                for m, q in result.quantized.items():
                    if m.startswith(prefix):
                        model.get_submodule(m).weight.copy_(q.dequantize())
        replace("blocks.0.")
        replace("blocks.1.")
        block2 = ["blocks.2.fc1", "blocks.2.fc2"]
        rec = record_inputs(model, ids, block2, forward=lambda mod, b: mod(b))
        replace("blocks.2.")
        rec_head = record_inputs(model, ids, ["lm_head"], forward=lambda mod, b: mod(b))
        for m, r in ((block2[0], rec), (block2[1], rec), ("lm_head", rec_head)):
            assert_close(self, result.hessian(m), blocks_of(r.hessian(m)), FP32_TOLERANCE, m)
        self.assertNotIn("lm_head", result.quantized)  # outside the layers: captured only
        error = np.abs(result.hessian("blocks.2.fc1") - static.hessian("blocks.2.fc1").numpy())
        self.assertGreater(error.max() / np.abs(result.hessian("blocks.2.fc1")).max(), 1e-3)

    def test_api_errors(self):
        down = testlib.Server()
        address = down.address
        down.stop()
        model = load(self.model_dir, torch.float32, torch.device("cpu"))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with self.assertRaises(nvfp4cal.SequentialError) as raised:
            nvfp4cal.calibrate_sequential(model, self.batches,
                                          nvfp4cal.Client([address], max_attempts=2),
                                          verbose=False)
        self.assertIn("quantizing model.layers.0.", str(raised.exception))
        self.assertIn("UNAVAILABLE", str(raised.exception))
        for n, p in model.named_parameters():  # nothing replaced
            self.assertTrue(torch.equal(p, before[n]), n)
        with self.assertRaisesRegex(nvfp4cal.CaptureMemoryError, "caches the inputs of a decoder"):
            nvfp4cal.calibrate_sequential(model, self.batches, [address], memory_fraction=1e-9,
                                          verbose=False)
        flat = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        with self.assertRaisesRegex(nvfp4cal.SequentialError, "has no decoder layers"):
            nvfp4cal.calibrate_sequential(flat, [torch.zeros(2, 16)], [address], verbose=False)
        with self.assertRaisesRegex(ValueError, "applies to method gptq only"):
            nvfp4cal.calibrate_sequential(model, self.batches, [address], method="dss",
                                          params={"damping": 0.1}, verbose=False)

    # --- the command line ------------------------------------------------------------------

    def calibrate_args(self, command, out, *extra):
        text = os.path.join(self.temp, "calib.txt")
        if not os.path.exists(text):
            with open(text, "w") as f:
                f.write(TEXT)
        return [command, "--model", self.model_dir, "--model-loader", "tiny_model:load",
                "--data", text, "--out", out, "--device", "cpu", "--dtype", "fp32",
                "--tokenizer", "bytes", "--seq-len", "32", "--samples", "6", "--batch", "4",
                "--quiet"] + list(extra)

    @staticmethod
    def run_in_process(args):
        """nvfp4cal's main() in this process (no torch import per run): (exit code, stderr)."""
        stderr = io.StringIO()
        saved = os.environ.get("NVFP4CAL_DEBUG")
        os.environ.pop("NVFP4CAL_DEBUG", None)
        try:
            with contextlib.redirect_stderr(stderr):
                code = nvfp4cal_cli.main([str(a) for a in args])
        finally:
            if saved is not None:
                os.environ["NVFP4CAL_DEBUG"] = saved
        return code, stderr.getvalue()

    def test_calibrate_quantize_sequential_with_a_local_server(self):
        folder = tempfile.mkdtemp(dir=self.temp)
        out, kept = os.path.join(folder, "nvfp4"), os.path.join(folder, "h.safetensors")
        done = testlib.run_python_cli(*self.calibrate_args(
            "calibrate-quantize", out, "--sequential", "--method", "dss", "--keep-hessians", kept,
            "--nvfp4cal", testlib.cli_binary(), "--kv-cache", "fp8", "--beta-step", "0.05"))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(sorted(os.listdir(folder)), ["h.safetensors", "nvfp4"])
        static_file = os.path.join(folder, "static.safetensors")
        code, stderr = self.run_in_process(self.calibrate_args("calibrate", static_file))
        self.assertEqual(code, 0, stderr)
        seq, meta = read_safetensors(kept)
        static, _ = read_safetensors(static_file)
        self.assertTrue(json.loads(meta["nvfp4cal.calibration"])["sequential"])
        self.assertEqual(sorted(seq), sorted(static))
        for name in seq:
            if name.startswith("model.layers.0.") and name.endswith(".hessian"):
                assert_close(self, seq[name].data, static[name].data.astype(np.float64), 1e-6,
                             name)
        differ = np.abs(seq["model.layers.1.mlp.down_proj.hessian"].data -
                        static["model.layers.1.mlp.down_proj.hessian"].data).max()
        self.assertGreater(differ, 0)
        with open(os.path.join(out, "hf_quant_config.json")) as f:
            self.assertEqual(json.load(f)["quantization"]["kv_cache_quant_algo"], "FP8")

    def assert_fails(self, message, *extra, command="calibrate"):
        folder = tempfile.mkdtemp(dir=self.temp)
        code, stderr = self.run_in_process(self.calibrate_args(
            command, os.path.join(folder, "out"), *extra))
        self.assertEqual(code, 1, stderr)
        self.assertIn(message, stderr)
        self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)  # one line
        self.assertTrue(stderr.startswith(f"nvfp4cal {command}: error: "), stderr)
        self.assertEqual(os.listdir(folder), [])  # nothing written

    def test_cli_bad_input_is_one_clear_error_and_writes_nothing(self):
        down = testlib.Server()
        address = down.address
        down.stop()
        self.assert_fails(f"--sequential: no server answers: server {address}: UNAVAILABLE",
                          "--sequential", "--server", address, "--retries", "1")
        self.assert_fails(f"--sequential: no server answers: server {address}: UNAVAILABLE",
                          "--sequential", "--server", address, "--retries", "1",
                          "--nvfp4cal", testlib.cli_binary(), command="calibrate-quantize")
        self.assert_fails("--server applies with --sequential only", "--server", address)
        self.assert_fails("--nvfp4cal-server /nonexistent: not an executable file",
                          "--sequential", "--nvfp4cal-server", "/nonexistent")
        self.assert_fails("--gptq-damping applies to --method gptq only", "--sequential",
                          "--gptq-damping", "0.1")
        self.assert_fails("--beta-step = 0.9 is out of range", "--sequential",
                          "--beta-step", "0.9")


if __name__ == "__main__":
    testlib.main()
