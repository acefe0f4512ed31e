#!/usr/bin/python3
"""An independent client of nvfp4cal-server: Python, Debian's grpcio, and numpy.

Proves the proto is usable outside C++: generates Python stubs from proto/ at test time, starts
the real server binary on a free port, quantizes tensors with method "max" through the Quantize
stream and checks every code and scale byte against a numpy implementation of the max method
written here from NUMERICS.md sections 1-3 (not from the kernels).

Stubs: Debian 12's python3-grpc-tools bundles protoc 3.5, which cannot parse proto3 `optional`
fields, so the system protoc (the build's, 3.21) parses calibrator.proto once into a descriptor
set and writes the message module; grpc_tools.protoc then writes the service stubs from that
descriptor set.

  /usr/bin/python3 python_client_test.py --server build/server/nvfp4cal-server \
      --proto_root proto --protoc /usr/bin/protoc --out build/tests/server/python

Exit 0: pass; 1: fail; 77: skipped (grpcio, grpc_tools or numpy missing).
"""

import argparse
import importlib
import os
import signal
import subprocess
import sys
import unittest

try:
    import grpc
    import numpy as np
    from grpc_tools import protoc as grpc_tools_protoc
except ImportError as error:  # pragma: no cover - depends on the machine
    print(f"SKIPPED: {error}; install python3-grpcio python3-grpc-tools python3-numpy "
          "(scripts/install-deps.sh)")
    sys.exit(77)

ARGS = None
PROTO = "nvfp4cal/v1/calibrator.proto"


def generate_stubs(proto_root, protoc, out):
    """Writes nvfp4cal/v1/calibrator_pb2{,_grpc}.py under `out` and returns the two modules."""
    os.makedirs(out, exist_ok=True)
    descriptor_set = os.path.join(out, "calibrator.desc")
    subprocess.run([protoc, f"--proto_path={proto_root}", "--include_imports",
                    f"--descriptor_set_out={descriptor_set}", f"--python_out={out}", PROTO],
                   check=True)
    # grpc_tools.protoc's own main: `python3 -m grpc_tools.protoc` adds an -I flag, which
    # protoc refuses together with --descriptor_set_in.
    status = grpc_tools_protoc.main(["grpc_tools.protoc", f"--descriptor_set_in={descriptor_set}",
                                     f"--grpc_python_out={out}", PROTO])
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with status {status}")
    sys.path.insert(0, out)
    return (importlib.import_module("nvfp4cal.v1.calibrator_pb2"),
            importlib.import_module("nvfp4cal.v1.calibrator_pb2_grpc"))


# --- NUMERICS.md sections 1-3, method max, in fp32 in the order written. ---------------------

F32 = np.float32


def e4m3_round(v):
    """Clamps to [2^-9, 448] and rounds to the nearest E4M3 value, ties to even (subnormals
    included). Returns the values as float32."""
    v = np.clip(v.astype(F32), F32(2.0 ** -9), F32(448.0))
    exponent = np.maximum(np.floor(np.log2(v.astype(np.float64))), -6.0)
    step = np.exp2(exponent - 3.0)  # 3 mantissa bits; subnormals share 2^-9
    # v / step is exact (a power-of-two scaling); np.rint rounds half to even.
    return (np.rint(v.astype(np.float64) / step) * step).astype(F32)


def e4m3_encode(q):
    """Bytes of E4M3 values produced by e4m3_round (bias 7, no sign)."""
    q = q.astype(np.float64)
    subnormal = q < 2.0 ** -6
    exponent = np.floor(np.log2(q))
    mantissa = np.where(subnormal, 0, q / np.exp2(exponent) * 8 - 8)
    normal_byte = (exponent + 7) * 8 + mantissa
    sub_byte = q / 2.0 ** -9
    return np.where(subnormal, sub_byte, normal_byte).astype(np.uint8)


def e4m3_decode(byte):
    byte = byte.astype(np.int64)
    exponent = byte >> 3
    mantissa = byte & 7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = mantissa / 8.0 * 2.0 ** -6
    return np.where(exponent == 0, subnormal, normal).astype(F32)


def e2m1_codes(y):
    """Magnitude by the table of NUMERICS section 2 (half to even), sign from y < 0."""
    a = np.abs(y)
    magnitude = np.select(
        [a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
        [0, 1, 2, 3, 4, 5, 6], default=7).astype(np.uint8)
    return magnitude | (np.where(y < 0, 8, 0).astype(np.uint8))


def quantize_max(w, global_amax=None):
    """w: float32 [rows, cols]. Returns (packed codes, scale bytes, g, s2) of the max method."""
    rows, cols = w.shape
    g = F32(np.max(np.abs(w))) if global_amax is None else F32(global_amax)
    s2 = F32(g / F32(2688.0))
    blocks = w.reshape(rows, cols // 16, 16)
    a_b = np.max(np.abs(blocks), axis=2).astype(F32)
    a_over_6 = np.where(a_b == 0, F32(1.0), a_b / F32(6.0)).astype(F32)
    v = ((a_over_6 * F32(448.0)).astype(F32) / F32(g / F32(6.0))).astype(F32)
    sf8 = e4m3_encode(e4m3_round(v))
    d = (e4m3_decode(sf8) * s2).astype(F32)
    y = (blocks / d[:, :, None]).astype(F32)  # a true fp32 division
    codes = e2m1_codes(y).reshape(rows, cols)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.astype(np.uint8), sf8.reshape(rows, cols // 16), g, s2


def bfloat16_bits(w):
    """bfloat16 bit patterns of float32 values (round to nearest even)."""
    bits = w.astype(F32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bfloat16_to_float32(bits):
    return (bits.astype(np.uint32) << 16).view(F32)


def example_weights(rows, cols, seed):
    """Weights with the cases the rounding rules single out: an all-zero block, blocks whose
    scale is an E4M3 subnormal, negative values that round to -0, heavy tails."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(F32)
    w[::7] *= F32(rng.standard_t(3, size=(1, cols)) * 4).astype(F32)
    w[0, :16] = 0.0
    w[1, 16:32] *= F32(1e-4)
    w[2, :16] = -w[2, :16] * F32(1e-3)
    w[3, 5] = F32(np.max(np.abs(w)) * 2)
    return w


def rounding_ties():
    """A float32 tensor whose every w / d lands exactly on an E2M1 rounding threshold.

    With g = 2.625, s2 = g / 2688 = 2^-10. A block holding 6 * 2^(k-10) as its amax gets
    v = 2^k exactly (every step of the max method is exact), so d = 2^(k-10) and an element
    t * 2^(k-10) divides back to t. Returns (weights, g)."""
    thresholds = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    block = np.array([6.0] + thresholds + [-t for t in thresholds] + [0.5], dtype=F32)
    rows = []
    for k in (-9, -7, -3, 0, 4, 8):  # 2^-9 is the smallest E4M3 value, 2^8 <= 448
        scale = F32(2.0 ** (k - 10))
        rows.append(np.concatenate([block, block[::-1]]) * scale)
    return np.stack(rows).astype(F32), F32(2.625)


# --- The test ------------------------------------------------------------------------------


class PythonClientTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.pb, cls.pb_grpc = generate_stubs(ARGS.proto_root, ARGS.protoc, ARGS.out)
        cls.server = subprocess.Popen(
            [ARGS.server, "--address=127.0.0.1:0", "--metrics_address=", "--device=cpu",
             "--max_rows_per_item=24"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cls.address = None
        for line in cls.server.stdout:
            if line.startswith("listening on "):
                cls.address = line[len("listening on "):].strip()
                break
        if cls.address is None:
            cls.server.wait()
            raise RuntimeError("the server printed no 'listening on' line: " +
                               cls.server.stderr.read())

    @classmethod
    def tearDownClass(cls):
        cls.server.send_signal(signal.SIGTERM)
        try:
            code = cls.server.wait(timeout=30)
        finally:
            if cls.server.poll() is None:
                cls.server.kill()
        assert code == 0, f"server exited with {code}"

    def channel(self):
        return grpc.insecure_channel(self.address)

    def test_server_info_lists_the_max_method(self):
        with self.channel() as channel:
            info = self.pb_grpc.CalibratorStub(channel).GetServerInfo(
                self.pb.GetServerInfoRequest(), timeout=10)
        self.assertEqual(info.backend, "cpu")
        self.assertIn("max", [m.name for m in info.methods])
        self.assertEqual(info.limits.max_rows_per_item, 24)

    def test_quantize_stream_matches_numpy_max_method(self):
        pb = self.pb
        bf16_rows, bf16_cols = 70, 256
        w_bf16_bits = bfloat16_bits(example_weights(bf16_rows, bf16_cols, seed=1))
        w_bf16 = bfloat16_to_float32(w_bf16_bits)  # the values the server sees
        w_f32 = example_weights(45, 128, seed=2)
        shared_amax = F32(np.max(np.abs(w_f32)) * F32(1.5))  # a fused group's larger g
        w_ties, ties_amax = rounding_ties()
        tensors = [
            # name, values, wire bytes, dtype, header global_amax (None: server computes it)
            ("layers.0.mlp.down_proj", w_bf16, w_bf16_bits.tobytes(), pb.DTYPE_BFLOAT16, None),
            ("layers.0.self_attn.v_proj", w_f32, w_f32.tobytes(), pb.DTYPE_FLOAT32, shared_amax),
            ("rounding_ties", w_ties, w_ties.tobytes(), pb.DTYPE_FLOAT32, ties_amax),
        ]

        def requests():
            yield pb.QuantizeRequest(session=pb.SessionOptions(client_name="python-client-test"))
            for name, values, data, dtype, amax in tensors:
                rows, cols = values.shape
                header = pb.TensorHeader(name=name, rows=rows, cols=cols, dtype=dtype,
                                         method=pb.MethodConfig(name="max"))
                if amax is not None:
                    header.global_amax = float(amax)
                yield pb.QuantizeRequest(header=header)
                row_bytes = len(data) // rows
                for row in range(0, rows, 16):
                    n = min(16, rows - row)
                    yield pb.QuantizeRequest(weights=pb.WeightChunk(
                        row_begin=row, num_rows=n,
                        data=data[row * row_bytes:(row + n) * row_bytes]))

        received = {name: {} for name, *_ in tensors}
        summaries = {}
        with self.channel() as channel:
            stub = self.pb_grpc.CalibratorStub(channel)
            for response in stub.Quantize(requests(), timeout=60):
                if response.HasField("result"):
                    r = response.result
                    self.assertNotIn(r.tensor_name, summaries, "chunk after its summary")
                    received[r.tensor_name][r.row_begin] = r
                else:
                    summaries[response.summary.tensor_name] = response.summary

        for name, values, _, _, amax in tensors:
            with self.subTest(tensor=name):
                rows, cols = values.shape
                chunks = [received[name][row] for row in sorted(received[name])]
                self.assertEqual(sum(c.num_rows for c in chunks), rows)
                codes = np.frombuffer(b"".join(c.packed_codes for c in chunks), np.uint8)
                scales = np.frombuffer(b"".join(c.scales for c in chunks), np.uint8)
                want_codes, want_scales, g, s2 = quantize_max(values, amax)
                self.assertEqual(codes.size, rows * cols // 2)
                self.assertEqual(scales.size, rows * cols // 16)
                bad_scales = np.flatnonzero(scales != want_scales.ravel())
                self.assertEqual(bad_scales.size, 0,
                                 f"{bad_scales.size} scale bytes differ, first at block "
                                 f"{bad_scales[:1]}")
                bad_codes = np.flatnonzero(codes != want_codes.ravel())
                self.assertEqual(bad_codes.size, 0,
                                 f"{bad_codes.size} code bytes differ, first at {bad_codes[:1]}")
                summary = summaries[name]
                self.assertEqual(F32(summary.global_amax), g)
                self.assertEqual(F32(summary.global_scale), s2)
                self.assertEqual(summary.stats.method, "max")
                self.assertEqual(summary.stats.num_blocks, rows * cols // 16)
                # The rounding rules were exercised: ties at every E2M1 threshold; a -0 code,
                # a subnormal scale, saturation.
                if name == "rounding_ties":
                    self.assertEqual(s2, F32(2.0 ** -10))
                    self.assertIn(1, want_scales)  # 2^-9, the smallest subnormal
                if amax is None:
                    self.assertIn(8, np.concatenate([codes & 15, codes >> 4]))
                    self.assertTrue(np.any(want_scales < 8))
                    self.assertIn(0x7E, want_scales)

    def test_bad_header_is_invalid_argument_with_the_field(self):
        pb = self.pb
        header = pb.TensorHeader(name="w", rows=4, cols=40, dtype=pb.DTYPE_FLOAT32,
                                 method=pb.MethodConfig(name="max"))
        with self.channel() as channel:
            stub = self.pb_grpc.CalibratorStub(channel)
            with self.assertRaises(grpc.RpcError) as raised:
                list(stub.Quantize(iter([pb.QuantizeRequest(header=header)]), timeout=10))
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("header.cols = 40", raised.exception.details())


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="nvfp4cal-server binary")
    parser.add_argument("--proto_root", required=True, help="folder holding nvfp4cal/v1/")
    parser.add_argument("--protoc", required=True, help="the system protoc (3.21)")
    parser.add_argument("--out", required=True, help="build folder for the generated stubs")
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
