#!/usr/bin/python3
"""A hostile or broken client against the real nvfp4cal-server binary (Python grpcio, raw bytes).

Each case is an attack or a mistake a client can make on the wire; each states what the server
must do and, for memory, the bound its resident set must keep (read from /proc/PID/status):

- bytes that are not protobuf, mid-stream and on every unary method: INVALID_ARGUMENT naming the
  message, never OK with the rest silently dropped nor UNIMPLEMENTED;
- a tensor name that is not UTF-8: INVALID_ARGUMENT;
- names of megabytes: refused at 1 KiB, the server's memory flat;
- a client that sends tensor after tensor and never reads: the server stops reading it, its
  memory stays bounded;
- streams that send a gptq header and stall: they hold no full-Hessian budget and are ended by
  --stream_idle_timeout;
- SIGTERM while tensors are in flight: every tensor read before it finishes with its summary,
  the next header gets UNAVAILABLE naming it;
- a send limit smaller than a result: results arrive in messages that fit.

  /usr/bin/python3 hostile_client_test.py --server build/server/nvfp4cal-server \
      --proto_root proto --protoc /usr/bin/protoc --out build/tests/server/python-hostile

Exit 0: pass; 1: fail; 77: skipped (grpcio, grpc_tools or numpy missing).
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from python_client_test import generate_stubs  # noqa: E402  (exits 77 without grpcio)

import grpc  # noqa: E402
import numpy as np  # noqa: E402

ARGS = None
PB = None
QUANTIZE = "/nvfp4cal.v1.Calibrator/Quantize"
UNARY = ["SubmitJob", "GetJob", "CancelJob", "ListJobs", "GetServerInfo"]


class Server:
    """The binary on a free port; stopped with SIGTERM (exit code checked) or killed."""

    def __init__(self, *flags):
        self.process = subprocess.Popen(
            [ARGS.server, "--address=127.0.0.1:0", "--metrics_address=", "--device=cpu",
             "--cpu_workers=1", "--cpu_threads_per_worker=1", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.address = None
        for line in self.process.stdout:
            if line.startswith("listening on "):
                self.address = line[len("listening on "):].strip()
                break
        if self.address is None:
            self.process.wait()
            raise RuntimeError("no 'listening on' line: " + self.process.stderr.read())
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)])

    def rss_bytes(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def raw_stream(self, messages, timeout=30):
        """Sends raw byte messages on Quantize, reads every response; (code, details, responses)."""
        call = self.channel.stream_stream(QUANTIZE)  # bytes in, bytes out
        responses = []
        try:
            for raw in call(iter(messages), timeout=timeout):
                responses.append(PB.QuantizeResponse.FromString(raw))
            return grpc.StatusCode.OK, "", responses
        except grpc.RpcError as error:
            return error.code(), error.details(), responses

    def stop(self, expect_code=0):
        self.channel.close()
        self.process.stdout.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        errors = self.process.stderr.read()
        self.process.stderr.close()
        assert code == expect_code, f"server exited with {code}: {errors}"


def header(name, rows, cols, method="max", amax=100.0, hessian=None, layout=None):
    h = PB.TensorHeader(name=name, rows=rows, cols=cols, dtype=PB.DTYPE_BFLOAT16,
                        method=PB.MethodConfig(name=method))
    if amax is not None:
        h.global_amax = amax
    if hessian is not None:
        h.hessian.name = hessian
        h.hessian.layout = layout
    return PB.QuantizeRequest(header=h)


def weights(rows, cols, row_begin=0, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # bf16 by truncation: any bits will do
    return PB.QuantizeRequest(weights=PB.WeightChunk(row_begin=row_begin, num_rows=rows,
                                                     data=bits.tobytes()))


def tensor(name, rows=16, cols=64, seed=0):
    """Serialized header and weights of a small max-method tensor."""
    return [header(name, rows, cols).SerializeToString(),
            weights(rows, cols, seed=seed).SerializeToString()]


class HostileClientTest(unittest.TestCase):

    def test_malformed_bytes_mid_stream_are_invalid_argument(self):
        server = Server()
        try:
            messages = tensor("t1") + [b"\xff\xff\xff"] + tensor("t2")
            code, details, _ = server.raw_stream(messages)
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
            self.assertIn("message 3 of the stream (3 bytes) is not a valid "
                          "nvfp4cal.v1.QuantizeRequest", details)
            # A name that is not UTF-8: the header's bytes with the name replaced.
            raw = header("placeholder", 16, 64).SerializeToString()
            raw = raw.replace(b"placeholder", b"\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc")
            code, details, _ = server.raw_stream([raw])
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, details)
            self.assertIn("not UTF-8", details)
            for method in UNARY:
                call = server.channel.unary_unary(f"/nvfp4cal.v1.Calibrator/{method}")
                with self.assertRaises(grpc.RpcError) as raised:
                    call(b"\xff\xff\xff", timeout=10)
                self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, method)
                self.assertIn(f"{method} request (3 bytes)", raised.exception.details())
        finally:
            server.stop()

    def test_megabyte_names_are_refused_and_memory_stays_flat(self):
        server = Server()
        try:
            before = server.rss_bytes()
            name = "n" * (4 << 20)
            for i in range(100):
                code, details, _ = server.raw_stream(
                    [header(f"{i % 10}{name}", 16, 64).SerializeToString()])
                self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
                self.assertIn("header.name has 4194305 bytes; the limit is 1024", details)
                self.assertLess(len(details), 300)
            # 100 x 4 MiB names sent; before the fix the server kept them all (> 400 MB).
            if not ARGS.sanitized:
                self.assertLess(server.rss_bytes() - before, 100 << 20)
        finally:
            server.stop()

    def test_client_that_never_reads_keeps_server_memory_bounded(self):
        server = Server("--max_unsent_result_bytes_per_stream=4194304")
        try:
            before = server.rss_bytes()
            pulled = [0]
            rows, cols = 1024, 1024  # 2 MiB of bf16, 576 KiB of results each

            def requests():
                for i in range(1500):
                    pulled[0] += 1
                    yield header(f"t{i}", rows, cols).SerializeToString()
                    yield weights(rows, cols, seed=i % 4).SerializeToString()

            call = server.channel.stream_stream(QUANTIZE)
            responses = call(requests(), timeout=120)  # never iterated: nothing is read
            time.sleep(4)
            grown = server.rss_bytes() - before
            responses.cancel()
            # Before the fix: 1 GB for 1,500 tensors. Bound: unsent results (4 MiB) + the
            # in-flight items (8 x 1024 rows) + HTTP/2 and gRPC buffers, well under 256 MiB.
            if not ARGS.sanitized:
                self.assertLess(grown, 256 << 20, f"server RSS grew by {grown >> 20} MiB")
            self.assertLess(pulled[0], 300, "the server kept reading a client that never reads")
        finally:
            server.stop()

    def test_stalled_gptq_headers_hold_no_budget_and_time_out(self):
        server = Server("--stream_idle_timeout=1s", "--max_full_hessian_bytes=100000")
        try:
            outcomes = []

            # A request iterator that yields the header and then blocks until the call ends.
            stalled = []
            for _ in range(2):
                release = threading.Event()

                def messages(release=release):
                    yield header("stalled", 16, 128, method="gptq", amax=None, hessian="h",
                                 layout=PB.HESSIAN_LAYOUT_FULL_UPPER).SerializeToString()
                    release.wait(20)

                def run(messages=messages):
                    outcomes.append(server.raw_stream(messages(), timeout=20)[:2])

                thread = threading.Thread(target=run)
                thread.start()
                stalled.append((thread, release))
            time.sleep(0.3)
            # A small gptq tensor runs meanwhile (64 inputs: 16 KiB of the 100 kB budget; the
            # two stalled headers would have reserved 2 x 64 kB before the fix).
            cols = 64
            h = np.eye(cols, dtype=np.float32) * 2.0
            upper = np.concatenate([h[r, r:] for r in range(cols)]).astype(np.float32)
            messages = [
                header("w", 16, cols, method="gptq", amax=None, hessian="small",
                       layout=PB.HESSIAN_LAYOUT_FULL_UPPER).SerializeToString(),
                PB.QuantizeRequest(hessian=PB.HessianChunk(
                    element_offset=0, data=upper.tobytes())).SerializeToString(),
                weights(16, cols).SerializeToString()]
            code, details, responses = server.raw_stream(messages)
            self.assertEqual(code, grpc.StatusCode.OK, details)
            self.assertTrue(any(r.HasField("summary") for r in responses))
            started = time.monotonic()
            for thread, release in stalled:
                thread.join(15)
                release.set()
            self.assertLess(time.monotonic() - started, 10)
            self.assertEqual(len(outcomes), 2)
            for code, details in outcomes:
                self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED, details)
                self.assertIn("stream_idle_timeout", details)
        finally:
            server.stop()

    def test_sigterm_finishes_every_tensor_read_before_it(self):
        server = Server("--drain_timeout=30s")
        try:
            sent = threading.Event()
            resume = threading.Event()

            def messages():
                for i in range(6):
                    yield from tensor(f"t{i}", rows=64, cols=256, seed=i)
                sent.set()
                resume.wait(20)
                yield header("t6", 64, 256).SerializeToString()

            result = []
            thread = threading.Thread(target=lambda: result.append(server.raw_stream(messages())))
            thread.start()
            self.assertTrue(sent.wait(20))
            time.sleep(0.5)  # the server reads t0-t5
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # draining before t6's header arrives
            resume.set()
            thread.join(30)
            code, details, responses = result[0]
            summaries = [r.summary.tensor_name for r in responses if r.HasField("summary")]
            self.assertEqual(sorted(summaries), [f"t{i}" for i in range(6)])
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, details)
            self.assertIn("tensor 't6' (message 13 of the stream) and every tensor after it were "
                          "not started; the stream's first 6 tensors finished", details)
        finally:
            server.stop()

    def test_results_fit_a_small_send_limit(self):
        server = Server("--max_send_message_bytes=1048576", "--max_rows_per_item=1024")
        try:
            rows, cols = 1024, 4096
            messages = [header("big", rows, cols).SerializeToString()]
            for begin in range(0, rows, 512):
                messages.append(weights(512, cols, row_begin=begin, seed=begin).SerializeToString())
            code, details, responses = server.raw_stream(messages)
            self.assertEqual(code, grpc.StatusCode.OK, details)
            covered = sum(r.result.num_rows for r in responses if r.HasField("result"))
            self.assertEqual(covered, rows)
        finally:
            server.stop()


def main():
    global ARGS, PB
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="nvfp4cal-server binary")
    parser.add_argument("--proto_root", required=True, help="folder holding nvfp4cal/v1/")
    parser.add_argument("--protoc", required=True, help="the system protoc (3.21)")
    parser.add_argument("--out", required=True, help="build folder for the generated stubs")
    parser.add_argument("--sanitized", action="store_true",
                        help="the server is an AddressSanitizer build: its quarantine keeps freed "
                             "memory resident, so resident-set bounds are not checked")
    ARGS, rest = parser.parse_known_args()
    PB, _ = generate_stubs(ARGS.proto_root, ARGS.protoc, ARGS.out)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
