"""nvfp4cal.Client: the Python client of nvfp4cal-server's Quantize stream.

The same protocol as the C++ `nvfp4cal::Client` (client/client.h), so the same bytes: weights
and Hessians go in chunks of at most 1 MiB and a quarter of the server's advertised
max_receive_message_bytes, the global amax is always sent (max |W| unless given, e.g. the
shared amax of a fused q/k/v group), Hessians are named per session and sent once, full
Hessians (method gptq) travel as their upper triangle, other methods' as diagonal blocks.

    client = nvfp4cal.Client(["gpu-0:50051"], token_file="token.txt", tls=True)
    q = client.quantize(weight, hessian=H, method="dss")        # one tensor, one session
    with client.session() as s:                                   # several, H sent once
        qq = s.quantize(wq, hessian=H, method="gptq", global_amax=g)
        qk = s.quantize(wk, hessian=H, method="gptq", global_amax=g, release_hessian=True)

A server error raises ServerError carrying the gRPC status code and the server's message; a
server answering UNAVAILABLE (down, draining) is retried with exponential backoff on the next
address, up to `max_attempts` per tensor.
"""

from __future__ import annotations

import itertools
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from . import _proto

METHODS = ("max", "mse", "local_hessian", "dss", "gptq")
# MethodConfig fields a caller may set, and which apply to gptq only.
_PARAMS = ("beta_step", "beta_half_range", "scale_neighbours", "symmetry_tolerance", "damping",
           "act_order", "block_columns", "scale_objective", "scale_search",
           "compare_local_hessian")
_GPTQ_PARAMS = ("damping", "act_order", "block_columns", "scale_objective", "scale_search",
                "compare_local_hessian")
_SERVICE = "/nvfp4cal.v1.Calibrator/"
# E2M1 magnitudes by code (NUMERICS §2); bit 3 is the sign.
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


class ServerError(RuntimeError):
    """A call failed: `code` is the grpc.StatusCode, `details` the server's message and
    `address` the server."""

    def __init__(self, address: str, code, details: str) -> None:
        self.address = address
        self.code = code
        self.details = details
        name = getattr(code, "name", str(code))
        super().__init__(f"server {address}: {name}: {details}")


@dataclass
class QuantizedTensor:
    """One tensor's NVFP4 result, the layout of ModelOpt's export: `packed_codes` uint8
    [rows, cols/2] (even element in the low nibble), `scales` the E4M3 bytes [rows, cols/16]
    (`<m>.weight_scale`), `global_scale` = global_amax / 2688 (`<m>.weight_scale_2`)."""
    name: str
    rows: int
    cols: int
    packed_codes: torch.Tensor
    scales: torch.Tensor
    global_amax: float
    global_scale: float
    stats: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, int] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """e2m1(code) * float(e4m3 scale) * global_scale in fp32, in that order (as
        `nvfp4cal dequantize`)."""
        codes = self.packed_codes.numpy()
        nibbles = np.stack([codes & 15, codes >> 4], axis=-1).reshape(self.rows, self.cols)
        values = _E2M1[nibbles & 7] * np.where(nibbles & 8, np.float32(-1), np.float32(1))
        scales = e4m3_to_float(self.scales.numpy()).repeat(16, axis=1)
        return torch.from_numpy((values * scales * np.float32(self.global_scale)).astype(np.float32))


def e4m3_to_float(data: np.ndarray) -> np.ndarray:
    """float32 values of E4M3 bytes (bias 7, subnormals; the scales are never negative)."""
    b = data.astype(np.int32)
    exponent, mantissa = (b >> 3) & 15, b & 7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = mantissa / 8.0 * 2.0 ** -6
    values = np.where(exponent == 0, subnormal, normal)
    return np.where(b & 0x80, -values, values).astype(np.float32)


def read_token_file(path: str) -> str:
    """The first line of `path` that is neither blank nor a '#' comment (as the C++ CLI)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                return line
    raise ValueError(f"{path}: no token (only blank lines and # comments)")


def _weight_bytes(weight) -> tuple:
    """(wire dtype name, numpy array of the weight's bytes, rows, cols, float32 amax)."""
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(np.ascontiguousarray(weight))
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or numpy array, not {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [rows, cols], got shape {list(weight.shape)}")
    rows, cols = weight.shape
    if rows <= 0 or cols <= 0 or cols % 16 != 0:
        raise ValueError(f"weight shape [{rows}, {cols}]: cols must be a positive multiple of 16")
    w = weight.detach().cpu().contiguous()
    kinds = {torch.bfloat16: "DTYPE_BFLOAT16", torch.float16: "DTYPE_FLOAT16",
             torch.float32: "DTYPE_FLOAT32"}
    if w.dtype not in kinds:
        raise ValueError(f"weight dtype {w.dtype}: expected bfloat16, float16 or float32")
    if not bool(torch.isfinite(w).all()):
        bad = torch.nonzero(~torch.isfinite(w))[0].tolist()
        raise ValueError(f"weight element ({bad[0]}, {bad[1]}) is {w[bad[0], bad[1]].item()}; "
                         f"weights must be finite")
    raw = w.view(torch.int16).numpy() if w.dtype == torch.bfloat16 else w.numpy()
    amax = float(w.abs().max().to(torch.float32))
    return kinds[w.dtype], raw, rows, cols, amax


def _hessian_array(hessian, cols: int) -> np.ndarray:
    """The Hessian as float32 numpy [cols, cols] or [cols/16, 16, 16]."""
    if isinstance(hessian, torch.Tensor):
        hessian = hessian.detach().to("cpu", torch.float32).numpy()
    h = np.ascontiguousarray(hessian, dtype=np.float32)
    if h.shape not in ((cols, cols), (cols // 16, 16, 16)):
        raise ValueError(f"hessian shape {list(h.shape)} does not match cols = {cols} "
                         f"(expected [{cols}, {cols}] or [{cols // 16}, 16, 16])")
    return h


def diagonal_blocks(h: np.ndarray) -> np.ndarray:
    """The diagonal 16x16 blocks [n/16, 16, 16] of a full [n, n] matrix."""
    j = h.shape[0] // 16
    index = np.arange(j)
    return np.ascontiguousarray(h.reshape(j, 16, j, 16)[index, :, index, :])


class Client:
    """Channels to one or more nvfp4cal servers (see the module docstring)."""

    def __init__(self, addresses: Union[str, Sequence[str]], *, tls: bool = False,
                 tls_ca: Optional[str] = None, tls_cert: Optional[str] = None,
                 tls_key: Optional[str] = None, token: Optional[str] = None,
                 token_file: Optional[str] = None, timeout: Optional[float] = None,
                 max_attempts: int = 4, chunk_bytes: int = 1 << 20,
                 client_name: str = "nvfp4cal-python", priority: int = 0) -> None:
        """addresses: "host:port" strings (or one comma-separated string). tls / tls_ca /
        tls_cert + tls_key: TLS (any of the files implies it). token or token_file: bearer
        token sent on every call. timeout: seconds per stream (None: no deadline)."""
        import grpc  # pylint: disable=import-outside-toplevel
        self._grpc = grpc
        self.pb = _proto.load()
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        self.addresses = list(addresses)
        if not self.addresses:
            raise ValueError("Client needs at least one server address")
        if token_file is not None:
            if token is not None:
                raise ValueError("give token or token_file, not both")
            token = read_token_file(token_file)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.max_attempts = max(1, int(max_attempts))
        self.chunk_bytes = int(chunk_bytes)
        self.client_name = client_name
        self.priority = priority
        credentials = None
        if tls or tls_ca or tls_cert or tls_key:
            def read(path):
                if path is None:
                    return None
                with open(path, "rb") as f:
                    return f.read()
            credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self._channels = [grpc.secure_channel(a, credentials, options) if credentials
                          else grpc.insecure_channel(a, options) for a in self.addresses]
        self._info: Dict[int, Any] = {}
        self._next = itertools.count()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _error(self, index: int, error) -> ServerError:
        return ServerError(self.addresses[index], error.code(), error.details() or str(error))

    def server_info(self, index: int = 0):
        """GetServerInfo of addresses[index] (cached): version, methods, limits."""
        if index not in self._info:
            call = self._channels[index].unary_unary(
                _SERVICE + "GetServerInfo",
                request_serializer=self.pb.GetServerInfoRequest.SerializeToString,
                response_deserializer=self.pb.ServerInfo.FromString)
            try:
                self._info[index] = call(self.pb.GetServerInfoRequest(), metadata=self._metadata,
                                         timeout=self.timeout or 30)
            except self._grpc.RpcError as error:
                raise self._error(index, error) from None
        return self._info[index]

    def session(self) -> "Session":
        """A Quantize session (several tensors, Hessians sent once); use it with `with`."""
        return Session(self)

    def quantize(self, weight, hessian=None, method: str = "dss", **options) -> QuantizedTensor:
        """Quantizes one tensor in its own session; see Session.quantize for the options."""
        with self.session() as session:
            return session.quantize(weight, hessian=hessian, method=method, **options)


class _Unavailable(Exception):
    pass


class Session:
    """One Quantize stream at a time (reopened on the next address when a server is
    unavailable, or when the server's session limits would be exceeded)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pb = client.pb
        self._index = next(client._next) % len(client.addresses)
        self._queue: Optional[queue.Queue] = None
        self._responses: Optional[Iterator] = None
        self._count = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self._hessians: Dict[tuple, str] = {}      # (id, full) -> name, while the object lives
        self._held: Dict[tuple, Any] = {}          # keeps those objects alive (ids stay unique)
        self._defined: Dict[str, tuple] = {}       # name -> (block bytes, full bytes)
        self._names: set = set()
        self._name_bytes = 0

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(cancel=exc_type is not None)

    # --- stream ----------------------------------------------------------------------------

    def _open(self) -> None:
        q: queue.Queue = queue.Queue()

        def requests():
            yield self.pb.QuantizeRequest(session=self.pb.SessionOptions(
                priority=self.client.priority, client_name=self.client.client_name))
            while True:
                item = q.get()
                if item is None:
                    return
                yield from item

        call = self.client._channels[self._index].stream_stream(
            _SERVICE + "Quantize", request_serializer=self.pb.QuantizeRequest.SerializeToString,
            response_deserializer=self.pb.QuantizeResponse.FromString)
        self._responses = call(requests(), metadata=self.client._metadata,
                               timeout=self.client.timeout)
        self._queue = q
        self._reset_state()

    def close(self, cancel: bool = False) -> None:
        """Half-closes the stream and waits for the server's OK (or cancels it)."""
        if self._queue is None:
            return
        q, responses = self._queue, self._responses
        self._queue, self._responses = None, None
        q.put(None)
        if cancel:
            responses.cancel()
            return
        try:
            for response in responses:
                raise ServerError(self.client.addresses[self._index],
                                  self.client._grpc.StatusCode.INTERNAL,
                                  f"unexpected response after the last summary: {response}")
        except self.client._grpc.RpcError as error:
            raise self.client._error(self._index, error) from None

    def _limits(self):
        return self.client.server_info(self._index).limits

    # --- one tensor --------------------------------------------------------------------------

    def quantize(self, weight, hessian=None, method: str = "dss", *, name: Optional[str] = None,
                 global_amax: Optional[float] = None, hessian_name: Optional[str] = None,
                 release_hessian: bool = False, full_hessian_layout: str = "upper",
                 **params) -> QuantizedTensor:
        """Quantizes `weight` (torch or numpy, [rows, cols], bf16 / fp16 / fp32) with `method`.

        hessian: [cols, cols] or [cols/16, 16, 16] (torch or numpy); methods other than gptq
        get its diagonal blocks, gptq needs the full matrix. The same Hessian object (or the
        same `hessian_name`) is sent once per session; `release_hessian` lets the server free
        it after this tensor. global_amax: the g to quantize with (default max |W|; give a
        fused group's shared value). full_hessian_layout: "upper" (half the bytes) or "full".
        params: MethodConfig fields (beta_step, beta_half_range, scale_neighbours,
        symmetry_tolerance; gptq: damping, act_order, block_columns, scale_objective,
        scale_search, compare_local_hessian); unset ones take the server's defaults."""
        if method not in METHODS:
            raise ValueError(f"method {method!r} is unknown; expected one of {', '.join(METHODS)}")
        for key in params:
            if key not in _PARAMS:
                raise TypeError(f"unknown parameter {key!r}; expected one of {', '.join(_PARAMS)}")
            if key in _GPTQ_PARAMS and method != "gptq":
                raise ValueError(f"parameter {key!r} applies to method gptq only")
        if full_hessian_layout not in ("upper", "full"):
            raise ValueError(f"full_hessian_layout {full_hessian_layout!r}: expected upper or full")
        dtype, raw, rows, cols, amax = _weight_bytes(weight)
        g = amax if global_amax is None else float(np.float32(global_amax))
        if g < amax:
            raise ValueError(f"global_amax {g} is below the weight's max |W| = {amax}")
        h = None if hessian is None else _hessian_array(hessian, cols)
        if h is None and method in ("local_hessian", "dss", "gptq"):
            raise ValueError(f"method {method} needs a hessian")
        if method == "gptq" and h is not None and h.ndim == 3:
            raise ValueError(f"method gptq needs the full [{cols}, {cols}] Hessian, got the "
                             f"diagonal blocks [{cols // 16}, 16, 16]")
        job = _Job(self, name, dtype, raw, rows, cols, g, method, params, hessian, h,
                   hessian_name, release_hessian, full_hessian_layout == "upper")
        delay = 0.1
        for attempt in range(1, self.client.max_attempts + 1):
            try:
                return job.run()
            except _Unavailable as unavailable:
                self.close(cancel=True)
                if attempt == self.client.max_attempts:
                    raise unavailable.args[0] from None
                self._index = (self._index + 1) % len(self.client.addresses)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")


class _Job:
    """One tensor's messages and result (Session.quantize's work, per attempt)."""

    def __init__(self, session: Session, name, dtype, raw, rows, cols, g, method, params,
                 hessian_object, h, hessian_name, release, upper) -> None:
        self.s, self.pb = session, session.pb
        self.name, self.dtype, self.raw, self.rows, self.cols = name, dtype, raw, rows, cols
        self.g, self.method, self.params = g, method, params
        self.hessian_object, self.h, self.hessian_name = hessian_object, h, hessian_name
        self.release, self.upper = release, upper

    def run(self) -> QuantizedTensor:
        s = self.s
        try:
            limits = s._limits()
        except ServerError as error:
            if error.code == s.client._grpc.StatusCode.UNAVAILABLE:
                raise _Unavailable(error) from None
            raise
        self._check_limits(limits)
        chunk_bytes = s.client.chunk_bytes
        if limits.max_receive_message_bytes > 0:
            chunk_bytes = min(chunk_bytes, limits.max_receive_message_bytes // 4)
        chunk_bytes = max(chunk_bytes, 1024)
        full = self.method == "gptq"
        if s._queue is not None and self._exceeds_session(limits, full):
            s.close()
        if s._queue is None:
            s._open()
        name = self.name or f"tensor-{s._count}"
        if name in s._names:
            raise ValueError(f"tensor name {name!r} is already used in this session")
        key, define = self._hessian_key(full)
        s._queue.put(self._messages(name, key, define, full, chunk_bytes))
        s._names.add(name)
        s._name_bytes += len(name.encode()) + 64
        s._count += 1
        try:
            return self._receive(name)
        except s.client._grpc.RpcError as error:
            wrapped = s.client._error(s._index, error)
            s.close(cancel=True)
            if error.code() == s.client._grpc.StatusCode.UNAVAILABLE:
                raise _Unavailable(wrapped) from None
            raise wrapped from None

    def _check_limits(self, limits) -> None:
        elements = self.rows * self.cols
        if limits.max_tensor_elements > 0 and elements > limits.max_tensor_elements:
            raise ValueError(f"{elements} elements exceed the server's max_tensor_elements "
                             f"{limits.max_tensor_elements}")
        row_bytes = self.raw.nbytes // self.rows
        if limits.max_receive_message_bytes > 0 and row_bytes + 4096 > limits.max_receive_message_bytes:
            raise ValueError(f"one row is {row_bytes} bytes, over the server's "
                             f"max_receive_message_bytes {limits.max_receive_message_bytes}")

    def _exceeds_session(self, limits, full: bool) -> bool:
        s = self.s
        block = sum(b for b, _ in s._defined.values())
        full_bytes = sum(f for _, f in s._defined.values())
        new_block = self.cols * 16 * 4 if self.h is not None else 0
        new_full = self.cols * self.cols * 4 if (full and self.h is not None) else 0
        name_bytes = len((self.name or "tensor-0000").encode()) + 64
        return ((limits.max_session_hessian_bytes > 0
                 and block + new_block > limits.max_session_hessian_bytes)
                or (limits.max_session_full_hessian_bytes > 0 and new_full > 0
                    and full_bytes + new_full > limits.max_session_full_hessian_bytes)
                or (limits.max_session_tensor_name_bytes > 0
                    and s._name_bytes + name_bytes > limits.max_session_tensor_name_bytes))

    def _hessian_key(self, full: bool):
        """(session name of the Hessian or "", whether this header defines it)."""
        s = self.s
        if self.h is None:
            return "", False
        identity = ("name", self.hessian_name, full) if self.hessian_name else \
            ("id", id(self.hessian_object), full)
        key = s._hessians.get(identity)
        define = key is None
        if define:
            key = f"{self.hessian_name or 'hessian'}-{len(s._hessians)}{'-full' if full else ''}"
            s._hessians[identity] = key
            s._held[identity] = self.hessian_object
            s._defined[key] = (self.cols * 16 * 4, self.cols * self.cols * 4 if full else 0)
        if self.release:
            s._hessians.pop(identity, None)
            s._held.pop(identity, None)
            s._defined.pop(key, None)
        return key, define

    def _method_config(self):
        config = self.pb.MethodConfig(name=self.method)
        for key, value in self.params.items():
            setattr(config, key, value)
        return config

    def _messages(self, name: str, key: str, define: bool, full: bool, chunk_bytes: int):
        pb = self.pb
        header = pb.TensorHeader(name=name, rows=self.rows, cols=self.cols,
                                 dtype=getattr(pb, self.dtype), method=self._method_config(),
                                 global_amax=self.g)
        if key:
            layout = (pb.HESSIAN_LAYOUT_BLOCK_DIAGONAL if not full else
                      pb.HESSIAN_LAYOUT_FULL_UPPER if self.upper else pb.HESSIAN_LAYOUT_FULL)
            header.hessian.name = key
            header.hessian.layout = layout
            header.hessian.release_after = self.release
        yield pb.QuantizeRequest(header=header)
        if define:
            yield from self._hessian_chunks(full, chunk_bytes)
        row_bytes = self.raw.nbytes // self.rows
        step = max(1, chunk_bytes // row_bytes)
        flat = self.raw.reshape(self.rows, -1)
        for r in range(0, self.rows, step):
            n = min(step, self.rows - r)
            yield pb.QuantizeRequest(weights=pb.WeightChunk(
                row_begin=r, num_rows=n, data=flat[r:r + n].tobytes()))

    def _hessian_chunks(self, full: bool, chunk_bytes: int):
        pb = self.pb
        if not full:
            blocks = self.h if self.h.ndim == 3 else diagonal_blocks(self.h)
            flat = blocks.reshape(-1)
            step = max(256, chunk_bytes // 4 // 256 * 256)
            for offset in range(0, flat.size, step):
                yield pb.QuantizeRequest(hessian=pb.HessianChunk(
                    element_offset=offset, data=flat[offset:offset + step].tobytes()))
            return
        step = max(256, chunk_bytes // 4)
        n = self.cols
        pieces = ((self.h[r, r:] for r in range(n)) if self.upper else iter([self.h.reshape(-1)]))
        buffer, buffered, sent = [], 0, 0
        for piece in pieces:
            done = 0
            while done < piece.size:
                take = min(piece.size - done, step - buffered)
                buffer.append(piece[done:done + take])
                buffered += take
                done += take
                if buffered == step:
                    yield pb.QuantizeRequest(hessian=pb.HessianChunk(
                        element_offset=sent, data=b"".join(p.tobytes() for p in buffer)))
                    sent += buffered
                    buffer, buffered = [], 0
        if buffered:
            yield pb.QuantizeRequest(hessian=pb.HessianChunk(
                element_offset=sent, data=b"".join(p.tobytes() for p in buffer)))

    def _receive(self, name: str) -> QuantizedTensor:
        codes = np.zeros((self.rows, self.cols // 2), dtype=np.uint8)
        scales = np.zeros((self.rows, self.cols // 16), dtype=np.uint8)
        covered = 0
        for response in self.s._responses:
            if response.HasField("result"):
                chunk = response.result
                if chunk.tensor_name != name:
                    raise RuntimeError(f"result for unexpected tensor {chunk.tensor_name!r}")
                r, n = chunk.row_begin, chunk.num_rows
                if (r < 0 or n <= 0 or r + n > self.rows
                        or len(chunk.packed_codes) != n * self.cols // 2
                        or len(chunk.scales) != n * self.cols // 16):
                    raise RuntimeError(f"{name}: malformed result chunk for rows {r}+{n}")
                codes[r:r + n] = np.frombuffer(chunk.packed_codes, np.uint8).reshape(n, -1)
                scales[r:r + n] = np.frombuffer(chunk.scales, np.uint8).reshape(n, -1)
                covered += n
            elif response.HasField("summary"):
                return self._result(name, response.summary, codes, scales, covered)
        raise ServerError(self.s.client.addresses[self.s._index],
                          self.s.client._grpc.StatusCode.INTERNAL,
                          f"the stream ended without a summary for {name}")

    def _result(self, name, summary, codes, scales, covered) -> QuantizedTensor:
        if summary.tensor_name != name or covered != self.rows:
            raise RuntimeError(f"{name}: summary of {summary.tensor_name!r} after {covered} of "
                               f"{self.rows} rows")
        if np.float32(summary.global_amax) != np.float32(self.g):
            raise RuntimeError(f"{name}: server used global amax {summary.global_amax}, "
                               f"sent {self.g}")
        stats = {f.name: getattr(summary.stats, f.name)
                 for f in summary.stats.DESCRIPTOR.fields if f.message_type is None}
        stats["params"] = {f.name: v for f, v in summary.stats.params.ListFields()}
        timings = {f.name: getattr(summary.timings, f.name)
                   for f in summary.timings.DESCRIPTOR.fields}
        return QuantizedTensor(name=name, rows=self.rows, cols=self.cols,
                               packed_codes=torch.from_numpy(codes),
                               scales=torch.from_numpy(scales),
                               global_amax=float(summary.global_amax),
                               global_scale=float(summary.global_scale),
                               stats=stats, timings=timings)
