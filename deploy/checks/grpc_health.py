#!/usr/bin/env python3
"""grpc.health.v1.Health/Check against TARGET, the way a Kubernetes gRPC probe does it.

usage: grpc_health.py TARGET [--service NAME] [--wait SECONDS] [--expect STATUS]

Needs only python3-grpcio (Debian 12 ships no grpc_health package): the request and the
response are serialized by hand. HealthCheckRequest is `string service = 1`; HealthCheckResponse
is `ServingStatus status = 1` (UNKNOWN 0, SERVING 1, NOT_SERVING 2, SERVICE_UNKNOWN 3), an empty
message meaning UNKNOWN. Prints the status; with --wait, retries (connection errors included)
until the status is --expect (default SERVING) or the time is up. Exit 0 when the last status
is the expected one, 1 otherwise.
"""
import argparse
import sys
import time

import grpc

NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def parse_status(buf):
    status, i = 0, 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
            if field == 1:
                status = value
        elif wire == 2:
            length, i = read_varint(buf, i)
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return status


def check(channel, service, timeout):
    name = service.encode()
    request = (b"\x0a" + varint(len(name)) + name) if name else b""
    call = channel.unary_unary("/grpc.health.v1.Health/Check")
    return NAMES.get(parse_status(call(request, timeout=timeout)), "?")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--service", default="")
    ap.add_argument("--wait", type=float, default=0)
    ap.add_argument("--expect", default="SERVING")
    a = ap.parse_args()
    deadline = time.monotonic() + a.wait
    with grpc.insecure_channel(a.target) as channel:
        while True:
            try:
                status = check(channel, a.service, 3)
            except grpc.RpcError as e:
                status = f"error {e.code().name}: {e.details()}"
            if status == a.expect or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    print(f"health {a.target} service={a.service!r}: {status}")
    return 0 if status == a.expect else 1


if __name__ == "__main__":
    sys.exit(main())
