"""Throughput and latency of a real `kws serve` under concurrent POST /detect clients, against the
in-process Detector in the same run.

    python bench/load.py [--model EXPORT] [--clients 16] [--seconds 20] [--workers 1 2]
    python bench/load.py --memory [--workers 2]     (60 s of load: server RSS after warm-up and at the end)

It starts one `kws serve` per --workers setting on free 127.0.0.1 ports, warms
them up, then runs two loads of 1 s clips (real Speech Commands clips when ../shared/data is
there, else tones), each in slices that visit the settings and the baseline in turn so that
the other jobs on the machine weigh on all alike:

- saturated: every client posts its next clip as soon as the last one is answered, which
  measures capacity (requests/s); latency is then clients / throughput, by Little's law;
- paced: the same clients post at half that capacity in total, which measures the latency
  a request sees on a busy but not overloaded server.

The baseline is a worker's detect() (decode + Detector) on the same clips in a loop, in this process, on
one thread: the work of one request without HTTP. The client runs on the same cores as the
server, so the server's share of the machine is a little less than the whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import numpy as np
import soundfile as sf

from kws import audio, workers
from kws.runtime import Model

SPEECH_COMMANDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech_commands"
WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go")
WARM_UP_SECONDS = 3.0
SLICES = 4


def wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def clips(count: int = 16, fmt: str = "wav") -> list[bytes]:
    """1 s clips as a client would post them: two of each keyword from Speech Commands, else
    tone bursts; 16-bit WAV (Speech Commands' own format), or as stored with ``fmt="stored"``
    (FLAC in ../shared/data, which costs the server ~0.25 ms more to decode)."""
    folders = [SPEECH_COMMANDS / word for word in WORDS if (SPEECH_COMMANDS / word).is_dir()]
    found = [path for folder in folders for path in sorted(filter(audio.is_audio_file, folder.iterdir()))[:2]]
    if found:
        if fmt == "stored":
            return [path.read_bytes() for path in found[:count]]
        return [wav(sf.read(path, dtype="int16")[0]) for path in found[:count]]
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    bursts = [
        0.3 * np.exp(-(((t - 0.5) / 0.15) ** 2)) * np.sin(2 * np.pi * (300 + 150 * i) * t)
        for i in range(count)
    ]
    return [wav((burst + 0.003 * rng.standard_normal(16000)).astype(np.float32)) for burst in bursts]


def in_process_rate(model: Model, data: list[bytes], seconds: float) -> tuple[int, float]:
    """(clips, seconds) of a worker's detect() on one thread: one request's work without HTTP."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        workers.detect(model, data[done % len(data)], "clip", 60.0, None, None)
        done += 1
    return done, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(model: str | None, workers: int):
    """A `kws serve` process; yields (url, pid) once /ready answers."""
    port = free_port()
    command = [sys.executable, "-m", "kws", "serve", "--port", str(port)]
    command += ["--model", model] if model else []
    command += ["--workers", str(workers)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if process.poll() is not None:
                raise SystemExit(f"kws serve exited: {process.stderr.read().decode()}")
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (the worker processes), in kB."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1])
    # Children are listed per thread of the process that started them.
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return total + sum(rss_kb(child) for child in children)


class Connection:
    """One keep-alive HTTP/1.1 connection posting audio: a client as light as wrk's.

    The clients share the server's two cores; httpx spends ~1.8 ms of CPU on a request,
    a third of what the server spends on it, which would bill the server for its client.
    """

    def __init__(self, url: str):
        host_port = url.removeprefix("http://")
        self.host, self.port = host_port.split(":")[0], int(host_port.split(":")[1])
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> int:
        """The response's status code; the connection is reopened after any failure."""
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: audio/wav\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            response = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", response)
            await reader.readexactly(int(length.group(1)) if length else 0)
            return int(response.split(b" ", 2)[1])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            return 0

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def load(url: str, data: list[bytes], clients: int, seconds: float, rate: float | None = None) -> dict:
    """Clients posting clips for ``seconds``: back to back, or at ``rate`` requests/s in total."""
    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        nonlocal errors
        connection, sent = Connection(url), 0
        if rate:
            await asyncio.sleep(index / rate)  # spread the clients' start over one period
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            errors += await connection.post("/detect", data[(index + sent) % len(data)]) != 200
            latencies.append(time.perf_counter() - start)
            sent += 1
            if rate:
                await asyncio.sleep(max(0.0, start + clients / rate - time.perf_counter()))
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"latencies": latencies, "errors": errors, "elapsed": time.perf_counter() - started}


def summary(slices: list[dict]) -> dict:
    """Slices of one setting's load, taken together."""
    ms = 1000 * np.array([latency for part in slices for latency in part["latencies"]])
    return {
        "rate": len(ms) / sum(part["elapsed"] for part in slices),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": sum(part["errors"] for part in slices),
        "requests": len(ms),
    }


def describe(result: dict) -> str:
    return (
        f"{result['rate']:6.1f} req/s, p50 {result['p50']:6.1f} ms, p99 {result['p99']:6.1f} ms, "
        f"{result['errors']} errors in {result['requests']} requests"
    )


def throughput(args, data: list[bytes]) -> None:
    """Every setting's server at once; the load visits them in turn, slice by slice, with the baseline."""
    settings = args.workers
    model = Model.load(args.model, named="--model")
    piece = args.seconds / SLICES
    with contextlib.ExitStack() as stack:
        urls = {setting: stack.enter_context(server(args.model, setting))[0] for setting in settings}
        for url in urls.values():
            asyncio.run(load(url, data, args.clients, WARM_UP_SECONDS))
        baseline, saturated = [], {setting: [] for setting in settings}
        for _ in range(SLICES):
            baseline.append(in_process_rate(model, data, piece / 2))
            for setting in settings:
                saturated[setting].append(asyncio.run(load(urls[setting], data, args.clients, piece)))
        full = {setting: summary(saturated[setting]) for setting in settings}
        paced = {setting: [] for setting in settings}
        for _ in range(SLICES):
            for setting in settings:
                rate = full[setting]["rate"] / 2
                paced[setting].append(asyncio.run(load(urls[setting], data, args.clients, piece, rate)))
    clips_per_second = sum(done for done, _ in baseline) / sum(seconds for _, seconds in baseline)
    print(f"in-process: {clips_per_second:.1f} clips/s (a worker's detect(), one thread)")
    for setting in settings:
        print(f"workers {setting}, {args.clients} clients:")
        ratio = full[setting]["rate"] / clips_per_second
        print(f"  saturated: {describe(full[setting])}; server / in-process {ratio:.2f}x")
        print(f"  paced at {full[setting]['rate'] / 2:.0f} req/s: {describe(summary(paced[setting]))}")


def memory(args, data: list[bytes]) -> None:
    workers = args.workers[0]
    with server(args.model, workers) as (url, pid):
        asyncio.run(load(url, data, args.clients, WARM_UP_SECONDS))
        start = rss_kb(pid)
        result = summary([asyncio.run(load(url, data, args.clients, 60))])
        end = rss_kb(pid)
    print(f"memory, workers {workers}, 60 s of {args.clients} clients:")
    print(f"  {describe(result)}")
    change = 100 * (end / start - 1)
    print(
        f"  server RSS after warm-up {start / 1024:.1f} MB, at the end {end / 1024:.1f} MB ({change:+.1f} %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="export folder or .tflite (default: the built-in model)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per setting, each way (default 20)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument(
        "--format",
        choices=["wav", "stored"],
        default="wav",
        help="post 16-bit WAV (default) or the clips as stored (FLAC)",
    )
    parser.add_argument("--memory", action="store_true", help="the 60 s memory check instead")
    args = parser.parse_args()
    data = clips(fmt=args.format)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the run; {len(data)} clips")
    if args.memory:
        memory(args, data)
    else:
        throughput(args, data)


if __name__ == "__main__":
    main()
