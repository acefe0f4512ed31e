#!/usr/bin/python3
"""nvfp4cal.capture against sums computed by hand with numpy.

Tolerances: with fp32 accumulation each H element is within 2e-6 x max |H| of numpy's fp64
X^T X (a few hundred fp32 products summed); with fp64 accumulation within one fp32 rounding
(2^-23 relative) of it, the result being stored as fp32.
"""

import os
import tempfile
import unittest

import numpy as np
import torch

import testlib  # noqa: F401  (sys.path)
import nvfp4cal
from nvfp4cal.hessians_file import read_safetensors, resolve_hessian_entry
from tiny_model import make_model


class InputRecorder:
    """Test hooks of its own: every Linear input, copied, with the mask applied by hand."""

    def __init__(self, model):
        self.inputs = {}
        self.mask = None
        self.handles = [m.register_forward_pre_hook(self._hook(n))
                        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            if self.mask is not None and x.shape[0] == self.mask.numel():
                x = x[self.mask.reshape(-1).bool()]
            self.inputs.setdefault(name, []).append(x.numpy())
        return hook

    def xtx(self, name):
        x = np.concatenate(self.inputs[name])
        return x.T @ x, x

    def remove(self):
        for h in self.handles:
            h.remove()


def batches(seed=1, count=3, batch=2, seq=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch, seq), generator=g) for _ in range(count)]


def blocks_of(h):
    j = h.shape[0] // 16
    return np.stack([h[16 * b:16 * b + 16, 16 * b:16 * b + 16] for b in range(j)])


class CaptureTest(unittest.TestCase):

    def capture(self, model, data, masks=None, **options):
        recorder = InputRecorder(model)
        options.setdefault("verbose", False)
        with nvfp4cal.capture(model, **options) as cap, torch.no_grad():
            for i, ids in enumerate(data):
                mask = None if masks is None else masks[i]
                cap.set_mask(mask)
                recorder.mask = mask
                model(ids, attention_mask=mask)
        recorder.remove()
        return cap, recorder

    def test_full_layout_equals_numpy_xtx_fp32_and_fp64(self):
        model = make_model()
        for dtype, tolerance in ((torch.float32, 2e-6), (torch.float64, 2.0 ** -23)):
            with self.subTest(dtype=dtype):
                cap, rec = self.capture(model, batches(), layout="full", dtype=dtype)
                for module in cap.modules:
                    want, x = rec.xtx(module)
                    got = cap.hessian(module, normalize=False).numpy().astype(np.float64)
                    if dtype == torch.float32:
                        error = np.abs(got - want).max() / np.abs(want).max()
                        self.assertLessEqual(error, tolerance, module)
                    else:
                        np.testing.assert_allclose(got, want, rtol=tolerance, atol=0,
                                                   err_msg=module)
                    np.testing.assert_array_equal(got, got.T)  # exactly symmetric
                    normalized = cap.hessian(module).numpy().astype(np.float64)
                    np.testing.assert_allclose(normalized, want / x.shape[0], rtol=1e-5,
                                               atol=1e-6 * np.abs(want).max() / x.shape[0])

    def test_block_layout_is_the_diagonal_blocks(self):
        model = make_model()
        cap, rec = self.capture(model, batches(), layout="block", dtype=torch.float64)
        for module in cap.modules:
            want, _ = rec.xtx(module)
            got = cap.hessian(module, normalize=False).numpy().astype(np.float64)
            self.assertEqual(got.shape, (want.shape[0] // 16, 16, 16))
            np.testing.assert_allclose(got, blocks_of(want), rtol=2.0 ** -23, atol=0)

    def test_auto_layout_follows_the_method(self):
        model = make_model()
        self.assertEqual(nvfp4cal.capture(model, method="gptq", verbose=False).layout, "full")
        self.assertEqual(nvfp4cal.capture(model, method="dss", verbose=False).layout, "block")
        self.assertEqual(nvfp4cal.capture(model, verbose=False).layout, "block")
        with self.assertRaisesRegex(ValueError, "gptq needs layout 'full'"):
            nvfp4cal.capture(model, layout="block", method="gptq", verbose=False)
        with self.assertRaisesRegex(ValueError, "method 'nope' is unknown"):
            nvfp4cal.capture(model, method="nope", verbose=False)

    def test_shared_inputs_are_detected_from_the_tensors(self):
        model = make_model()
        cap, _ = self.capture(model, batches())
        groups = cap.groups()
        for layer in range(2):
            p = f"model.layers.{layer}."
            self.assertEqual(groups[p + "self_attn.q_proj"],
                             [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"])
            self.assertEqual(groups[p + "mlp.gate_proj"], [p + "mlp.gate_proj", p + "mlp.up_proj"])
            self.assertEqual(groups[p + "self_attn.o_proj"], [p + "self_attn.o_proj"])
            self.assertEqual(groups[p + "mlp.down_proj"], [p + "mlp.down_proj"])
        self.assertNotIn("lm_head", cap.modules)  # a default exclude, as quantize's

    def test_names_do_not_matter_only_the_tensors(self):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.alpha, self.beta, self.q_proj, self.k_proj = (
                    torch.nn.Linear(32, 16) for _ in range(4))

            def forward(self, x, attention_mask=None):
                # alpha and beta read the same tensor; q_proj and k_proj equal values but
                # different tensors (a copy), so they must not share.
                return self.alpha(x) + self.beta(x) + self.q_proj(x) + self.k_proj(x.clone())

        cap, _ = self.capture(Net(), [torch.randn(3, 5, 32) for _ in range(2)])
        self.assertEqual(cap.groups(), {"alpha": ["alpha", "beta", "q_proj"], "k_proj": ["k_proj"]})

    def test_mask_leaves_padding_out(self):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.k_proj = torch.nn.Linear(32, 16)

            def forward(self, x, attention_mask=None):
                return self.k_proj(x)

        x = torch.randn(2, 6, 32)
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
        x[0, 4:] = 1000.0  # padding: must change neither H, nor the amax
        cap, _ = self.capture(Net(), [x], masks=[mask], layout="full", dtype=torch.float64)
        real = x.reshape(-1, 32)[mask.reshape(-1).bool()].double().numpy()
        np.testing.assert_allclose(cap.hessian("k_proj", normalize=False).numpy(),
                                   real.T @ real, rtol=2.0 ** -23)
        self.assertEqual(cap.num_tokens, 10)
        self.assertEqual(cap.input_amax("k_proj"), float(np.float32(np.abs(real).max())))
        with torch.no_grad():  # the output amax is masked too
            y = cap.modules["k_proj"](x).reshape(-1, 16)[mask.reshape(-1).bool()]
        self.assertEqual(cap.output_amax()["k_proj"], float(y.abs().max()))

    def test_amax_of_inputs_and_kv_outputs(self):
        model = make_model()
        cap, rec = self.capture(model, batches())
        for module in cap.modules:
            _, x = rec.xtx(module)
            self.assertEqual(cap.input_amax(module), float(np.float32(np.abs(x).max())), module)
        outputs = cap.output_amax()
        self.assertEqual(sorted(outputs), sorted(m for m in cap.modules
                                                 if m.endswith(("k_proj", "v_proj"))))
        self.assertTrue(all(v > 0 for v in outputs.values()))

    def test_diverging_shared_inputs_are_an_error(self):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj, self.k_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
                self.calls = 0

            def forward(self, x, attention_mask=None):
                self.calls += 1
                return self.q_proj(x) + self.k_proj(x if self.calls == 1 else x * 2)

        with self.assertRaisesRegex(RuntimeError, "share_inputs=False"):
            self.capture(Net(), [torch.randn(2, 16), torch.randn(2, 16)])
        cap, _ = self.capture(Net(), [torch.randn(2, 16), torch.randn(2, 16)],
                              share_inputs=False)
        self.assertEqual(len(cap.groups()), 2)

    def test_moe_experts_are_captured_and_unmaskable_inputs_warned(self):
        class Expert(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w1, self.w2, self.w3 = (torch.nn.Linear(32, 48, bias=False),
                                             torch.nn.Linear(48, 32, bias=False),
                                             torch.nn.Linear(32, 48, bias=False))

            def forward(self, x):
                return self.w2(torch.relu(self.w1(x)) * self.w3(x))

        class Moe(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.experts = torch.nn.ModuleList(Expert() for _ in range(3))

            def forward(self, x, attention_mask=None):
                flat = x.reshape(-1, 32)
                route = flat.sum(-1).abs().argsort() % 3
                out = torch.zeros_like(flat)
                for e, expert in enumerate(self.experts):
                    rows = route == e
                    out[rows] = expert(flat[rows])
                return out

        logged = []
        model = Moe()
        with nvfp4cal.capture(model, log=logged.append) as cap, torch.no_grad():
            for _ in range(2):
                cap.set_mask(torch.ones(2, 9))
                model(torch.randn(2, 9, 32))
        groups = cap.groups()
        for e in range(3):
            self.assertEqual(groups[f"experts.{e}.w1"], [f"experts.{e}.w1", f"experts.{e}.w3"])
        self.assertTrue(any("does not match the mask" in line for line in logged), logged)

    def test_memory_refusal_installs_nothing(self):
        model = make_model()
        cap = nvfp4cal.capture(model, layout="full", memory_fraction=1e-12, verbose=False)
        with self.assertRaisesRegex(nvfp4cal.CaptureMemoryError, r"need .* but only .* available"):
            with cap:
                pass
        self.assertFalse(any(m._forward_pre_hooks for m in model.modules()))
        plan = cap.memory_plan()
        (expected, worst), = plan.values()
        self.assertLess(expected, worst)  # q/k/v and gate/up expected to share

    def test_model_without_linear_layers_is_refused(self):
        with self.assertRaisesRegex(ValueError, "no torch.nn.Linear layers"):
            nvfp4cal.capture(torch.nn.Sequential(torch.nn.ReLU()), verbose=False)

    def test_saved_file_follows_the_sharing_rule(self):
        model = make_model()
        for layout in ("block", "full"):
            with self.subTest(layout=layout):
                cap, _ = self.capture(model, batches(), layout=layout)
                with tempfile.TemporaryDirectory() as temp:
                    path = os.path.join(temp, "h.safetensors")
                    cap.save(path)
                    tensors, meta = read_safetensors(path)
                entries = [n for n in tensors if n.endswith(".hessian")]
                self.assertEqual(len(entries), 8)  # 2 layers x (qkv, o, gate/up, down)
                for module in cap.modules:
                    entry = resolve_hessian_entry(module, tensors, meta)
                    self.assertEqual(entry, cap._of_module[module].leader + ".hessian")
                    n = cap.modules[module].in_features
                    shape = (n, n) if layout == "full" else (n // 16, 16, 16)
                    self.assertEqual(tensors[entry].shape, shape)
                    amax = tensors[entry[:-len(".hessian")] + ".input_amax"]
                    self.assertEqual((amax.dtype, amax.shape), ("F32", ()))
                for alias, target in ((k, v) for k, v in meta.items() if k.endswith(".hessian")
                                      and not k.startswith("tokens.")):
                    self.assertIn(target, tensors)
                    self.assertNotIn(alias, tensors)
                self.assertEqual(meta["nvfp4cal.layout"], layout)
                self.assertEqual(meta["nvfp4cal.tokens"], str(3 * 2 * 12))
                self.assertIn("model.layers.1.self_attn.v_proj.output_amax", tensors)


if __name__ == "__main__":
    testlib.main()
