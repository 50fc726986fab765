#!/usr/bin/env python3
"""Rough connect-rate and idle-memory probe for one broker (stdlib only).

Opens N MQTT 3.1.1 connections with username/password, `inflight` CONNECTs outstanding at a time,
waits for every CONNACK, then reads the broker's RSS (from /proc/PID/status) and closes them.

    python3 benches/idle_connections.py --port 18830 --pid PID -n 5000 -u demo-sensor -P demo-sensor-secret
"""
import argparse
import asyncio
import time


def connect_packet(client_id: str, user: str, password: str, keep_alive: int = 300) -> bytes:
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    flags = 0x02 | 0x80 | 0x40  # clean session, username, password
    body = s(b"MQTT") + bytes([4, flags]) + keep_alive.to_bytes(2, "big")
    body += s(client_id.encode()) + s(user.encode()) + s(password.encode())
    length, rem = b"", len(body)
    while True:
        byte, rem = rem % 128, rem // 128
        length += bytes([byte | (0x80 if rem else 0)])
        if not rem:
            break
    return b"\x10" + length + body


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="broker process id, for RSS")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--inflight", type=int, default=50)
    ap.add_argument("-u", "--user", required=True)
    ap.add_argument("-P", "--password", required=True)
    ap.add_argument("--tcp-only", action="store_true", help="open sockets without sending CONNECT")
    ap.add_argument("--prefix", default="idle", help="client id prefix; vary it to churn new ids")
    args = ap.parse_args()

    before = rss_kib(args.pid)
    sem = asyncio.Semaphore(args.inflight)
    conns, refused, latencies = [], 0, []

    async def one(i: int) -> None:
        nonlocal refused
        async with sem:
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection(args.host, args.port)
            if args.tcp_only:
                conns.append(writer)
                return
            writer.write(connect_packet(f"{args.prefix}-{i}", args.user, args.password))
            ack = await reader.readexactly(4)
            latencies.append(time.perf_counter() - t0)
            if ack[0] != 0x20 or ack[3] != 0:
                refused += 1
            conns.append(writer)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.n)))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(1)  # let the broker settle before reading RSS (a measurement, not a sync)
    after = rss_kib(args.pid)
    latencies.sort()
    print(f"connections={args.n} refused={refused} seconds={elapsed:.2f} "
          f"connects_per_s={args.n / elapsed:.0f} connack_p50_ms={latencies[len(latencies) // 2] * 1000 if latencies else 0:.1f} "
          f"rss_before_kib={before} rss_after_kib={after} "
          f"kib_per_connection={(after - before) / args.n:.2f}")
    for w in conns:
        w.close()


asyncio.run(main())
