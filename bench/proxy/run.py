"""Benchmark PD proxies against fast mock backends, side by side with wrk.

For each cell (streamed or not, concurrency 1, 16, 64) the same wrk load is
sent straight to the mock decoder ("direct") and through every target proxy,
one after the other in the same run, for ``--rounds`` rounds. Reported per
target and cell: requests/s, latency p50 and p99, the latency the proxy adds
over the direct path, and the proxy's CPU time per request (all its
processes and threads), which other tenants of a shared machine disturb
much less than throughput.

Placement: targets run pinned to ``--proxy-core``; the mock backends and wrk
share ``--load-core``.

Run from the repository root with a Python that has the bench extra
(``pip install -e '.[bench]'``) and ``wrk`` on PATH::

    python bench/proxy/run.py --targets pdproxy,aiohttp-bare --json out.json

Only 127.0.0.1 is used. Every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
CANDIDATES = HERE / "candidates"
LUA = HERE / "post.lua"
HOST = "127.0.0.1"
PYTHON = sys.executable
BIN = Path(PYTHON).parent

Command = Callable[[int, int, int], list[str]]


def _pdproxy(loop: str, *extra: str) -> Command:
    def command(port: int, p: int, d: int) -> list[str]:
        return [
            PYTHON,
            "-m",
            "pdsupervisord.proxy",
            "--port",
            str(port),
            "--prefiller-ports",
            str(p),
            "--decoder-ports",
            str(d),
            "--event-loop",
            loop,
            "--health-check-interval",
            "0",
            *extra,
        ]

    return command


def _baseline(port: int, p: int, d: int) -> list[str]:
    # Only flags every version has: the baseline runs with its own defaults.
    return [
        *(PYTHON, "-m", "pdsupervisord.proxy", "--port", str(port)),
        *("--prefiller-ports", str(p), "--decoder-ports", str(d)),
    ]


def _bare(loop: str) -> Command:
    def command(port: int, p: int, d: int) -> list[str]:
        return [PYTHON, str(CANDIDATES / "aiohttp_bare.py"), str(port), loop]

    return command


def _uvicorn(module: str) -> Command:
    def command(port: int, p: int, d: int) -> list[str]:
        return [
            PYTHON,
            "-m",
            "uvicorn",
            f"{module}:app",
            "--host",
            HOST,
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]

    return command


def _granian(port: int, p: int, d: int) -> list[str]:
    return [
        str(BIN / "granian"),
        "--interface",
        "asgi",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--runtime-threads",
        "1",
        "--loop",
        "uvloop",
        "--no-ws",
        "--log-level",
        "warning",
        "asgi_aiohttp:app",
    ]


def _router(port: int, p: int, d: int) -> list[str]:
    return [
        str(BIN / "vllm-router"),
        "--host",
        HOST,
        "--port",
        str(port),
        "--vllm-pd-disaggregation",
        "--prefill",
        f"http://{HOST}:{p}",
        "--decode",
        f"http://{HOST}:{d}",
        "--policy",
        "round_robin",
        "--log-level",
        "warning",
    ]


TARGETS: dict[str, Command] = {
    "pdproxy": _pdproxy("asyncio"),
    "pdproxy-uvloop": _pdproxy("uvloop"),
    # The per-request log line off: what that line costs.
    "pdproxy-nolog": _pdproxy("asyncio", "--log-level", "warning"),
    "aiohttp-bare": _bare("asyncio"),
    "aiohttp-bare-uvloop": _bare("uvloop"),
    "uvicorn-aiohttp": _uvicorn("asgi_aiohttp"),
    "granian-aiohttp": _granian,
    "fastapi-httpx": _uvicorn("fastapi_httpx"),
    "vllm-router": _router,
}


@dataclass
class Sample:
    """One wrk run against one target."""

    target: str
    stream: bool
    concurrency: int
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float

    @property
    def cpu_us_per_request(self) -> float:
        """CPU time the target spent per request, in microseconds."""
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")


@dataclass
class Running:
    """A started process group and what to call it."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start(
    name: str, argv: list[str], core: int, logdir: Path, port: int, **popen: object
) -> Running:
    """Start ``argv`` pinned to ``core`` in its own process group."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,  # type: ignore[arg-type]
        )
    return Running(name, process, port, log)


def stop(running: Running) -> None:
    """SIGTERM the process group, SIGKILL after 5 s."""
    if running.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(running.process.pid, signal.SIGTERM)
    try:
        running.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait(timeout=5)


def post(port: int, stream: bool) -> tuple[int, bytes]:
    """One request as wrk sends it; returns status and body."""
    body = json.dumps(
        {"model": "bench", "prompt": "hi", "max_tokens": 16, "stream": stream}
    )
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        connection.request(
            "POST", "/v1/completions", body, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_ready(running: Running, timeout: float = 60.0) -> None:
    """Wait until the target answers a streamed and a whole request right.

    Raises:
        RuntimeError: it exited, or did not answer right within the timeout.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            break
        try:
            whole = post(running.port, stream=False)
            streamed = post(running.port, stream=True)
        except OSError as exc:
            last = repr(exc)
            time.sleep(0.2)
            continue
        done = streamed[1].rstrip().endswith(b"data: [DONE]")
        if whole[0] == 200 and streamed[0] == 200 and done:
            return
        last = f"answers {whole[0]} / {streamed[0]}: {streamed[1][-200:]!r}"
        time.sleep(0.2)
    log = running.log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{running.name} not ready: {last}\n{log}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            times = process.cpu_times()
            total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return float("nan")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests, duration, p50, p99 and errors from ``wrk --latency``."""
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", output)
    if done is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    seconds = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    errors = 0
    for match in re.finditer(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(match.group(1))
    socket_errors = re.search(r"Socket errors: (.*)", output)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    return {
        "requests": int(done.group(1)),
        "seconds": seconds,
        "p50_ms": _ms(p50.group(1)) if p50 else float("nan"),
        "p99_ms": _ms(p99.group(1)) if p99 else float("nan"),
        "errors": errors,
    }


def wrk(
    port: int, stream: bool, concurrency: int, seconds: int, core: int
) -> dict[str, float]:
    """Run wrk pinned to ``core`` against a target's port."""
    env = {**os.environ, "BENCH_STREAM": "1" if stream else "0", "BENCH_TOKENS": "16"}
    argv = ["taskset", "-c", str(core), "wrk", "-t1", f"-c{concurrency}"]
    argv += [f"-d{seconds}s", "--latency", "-s", str(LUA)]
    argv += [f"http://{HOST}:{port}/v1/completions"]
    output = subprocess.run(
        argv, env=env, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    return parse_wrk(output)


def measure(
    running: Running,
    stream: bool,
    concurrency: int,
    round_: int,
    args: argparse.Namespace,
) -> Sample:
    """One wrk run on one target, with its CPU time."""
    before = cpu_seconds(running.process.pid)
    result = wrk(running.port, stream, concurrency, args.duration, args.load_core)
    used = cpu_seconds(running.process.pid) - before
    requests = int(result["requests"])
    return Sample(
        target=running.name,
        stream=stream,
        concurrency=concurrency,
        round=round_,
        requests=requests,
        seconds=result["seconds"],
        rps=requests / result["seconds"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        errors=int(result["errors"]),
        cpu_s=used,
    )


@contextlib.contextmanager
def processes(args: argparse.Namespace, logdir: Path) -> Iterator[list[Running]]:
    """Start the mocks and the targets; stop them all at the end."""
    started: list[Running] = []
    try:
        p_port, d_port = free_port(), free_port()
        mock = [PYTHON, str(HERE / "mock_backend.py"), "--port", str(p_port)]
        mock += ["--port", str(d_port), "--tokens", "16"]
        mocks = start("mocks", mock, args.load_core, logdir, d_port)
        started.append(mocks)
        wait_ready(mocks)
        targets = [Running("direct", mocks.process, d_port, mocks.log)]
        env = {
            **os.environ,
            "BENCH_PREFILL": f"http://{HOST}:{p_port}",
            "BENCH_DECODE": f"http://{HOST}:{d_port}",
            "PYTHONPATH": str(CANDIDATES),
        }
        for name in args.targets:
            port = free_port()
            argv = TARGETS[name](port, p_port, d_port)
            target_env = env
            if name == "pdproxy-baseline":
                target_env = {**env, "PYTHONPATH": f"{args.baseline}:{CANDIDATES}"}
            running = start(
                name,
                argv,
                args.proxy_core,
                logdir,
                port,
                env=target_env,
                cwd=CANDIDATES,
            )
            started.append(running)
            wait_ready(running)
            targets.append(running)
        yield targets
    finally:
        for running in reversed(started):
            stop(running)


def run(args: argparse.Namespace, logdir: Path) -> list[Sample]:
    """Every cell, every round, every target; interleaved."""
    samples: list[Sample] = []
    with processes(args, logdir) as targets:
        for running in targets[1:]:  # warm up: connection pools, caches
            for stream in (False, True):
                wrk(running.port, stream, 16, 1, args.load_core)
        for stream in (False, True):
            for concurrency in args.concurrency:
                for round_ in range(args.rounds):
                    order = targets[round_ % len(targets) :]
                    order += targets[: round_ % len(targets)]
                    for running in order:
                        sample = measure(running, stream, concurrency, round_, args)
                        samples.append(sample)
                        print(_progress(sample), file=sys.stderr, flush=True)
    return samples


def _progress(s: Sample) -> str:
    return (
        f"{s.target:>20} stream={int(s.stream)} c={s.concurrency:<3} "
        f"{s.rps:8.0f} req/s p50 {s.p50_ms:7.3f} ms p99 {s.p99_ms:7.3f} ms "
        f"cpu {s.cpu_us_per_request:7.0f} us/req errors {s.errors}"
    )


def best(samples: list[Sample]) -> Sample:
    """The round with the most requests/s: the one least disturbed."""
    return max(samples, key=lambda s: s.rps)


def table(samples: list[Sample], targets: list[str]) -> str:
    """A markdown table: best round per target and cell, added latency."""
    lines = [
        "| target | stream | conc. | req/s | p50 ms | p99 ms | added p50 ms "
        "| added p99 ms | CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted({(s.stream, s.concurrency) for s in samples})
    for stream, concurrency in cells:
        here = [
            s for s in samples if (s.stream, s.concurrency) == (stream, concurrency)
        ]
        direct_runs = [s for s in here if s.target == "direct"]
        direct = best(direct_runs)
        # The direct path's latency in the same run: the median of its rounds.
        d50 = statistics.median(s.p50_ms for s in direct_runs)
        d99 = statistics.median(s.p99_ms for s in direct_runs)
        for name in ["direct", *targets]:
            runs = [s for s in here if s.target == name]
            if not runs:
                continue
            top = best(runs) if name != "direct" else direct
            p50 = statistics.median(s.p50_ms for s in runs)
            p99 = statistics.median(s.p99_ms for s in runs)
            cpu = statistics.median(s.cpu_us_per_request for s in runs)
            added = "" if name == "direct" else f"{p50 - d50:.3f}"
            added99 = "" if name == "direct" else f"{p99 - d99:.3f}"
            cpu_text = "" if name == "direct" else f"{cpu:.0f}"
            lines.append(
                f"| {name} | {'yes' if stream else 'no'} | {concurrency} "
                f"| {top.rps:,.0f} | {p50:.3f} | {p99:.3f} | {added} | {added99} "
                f"| {cpu_text} | {sum(s.errors for s in runs)} |"
            )
    return "\n".join(lines)


_BEGIN = "<!-- bench:proxy begin -->"
_END = "<!-- bench:proxy end -->"


def environment() -> dict[str, str]:
    """Date, machine, load and software versions, for the results file."""
    from importlib import metadata  # noqa: PLC0415 - only when writing results

    versions = []
    for name in (
        "pdsupervisord",
        "aiohttp",
        "uvloop",
        "uvicorn",
        "httptools",
        "granian",
        "fastapi",
        "httpx",
        "vllm-router",
    ):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    wrk_version = subprocess.run(
        ["wrk", "-v"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return {
        "date": subprocess.run(
            ["date", "-u"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "machine": f"{os.cpu_count()} CPUs, {model}, "
        f"{psutil.virtual_memory().total / 2**30:.1f} GiB memory",
        "software": f"Python {sys.version.split()[0]}, "
        + ", ".join(versions)
        + (f", {wrk_version[0].split(' [')[0]}" if wrk_version else ""),
        "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def section(
    samples: list[Sample],
    args: argparse.Namespace,
    env_before: dict[str, str],
    note: str,
) -> str:
    """The results file's proxy section, markers included."""
    command = "python bench/proxy/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        _BEGIN,
        "## Proxy: requests/s and added latency",
        "",
        f"- Command: `{command}`",
        f"- Date: {env_before['date']}",
        f"- Machine: {env_before['machine']}",
        f"- Software: {env_before['software']}",
        f"- Load average before / after: {env_before['load']} / {load_after}",
        f"- Pinning: targets on CPU {args.proxy_core}; wrk (one thread) and the "
        f"mock backends (`bench/proxy/mock_backend.py`, one process, no delay, "
        f"16 tokens per stream) on CPU {args.load_core}.",
        f"- Method: per cell, wrk runs {args.duration} s against the mock decoder "
        f"(direct) and through each target, one after the other, for "
        f"{args.rounds} rounds in rotated order. req/s: best round (least "
        "disturbed); p50, p99 and CPU: median of the rounds; added = the "
        "target's median minus the direct path's, same cell. CPU µs/req: user + "
        "system time of the target's processes over requests served: the "
        "column other tenants of the machine disturb least.",
        "",
        table(samples, args.targets),
    ]
    if note:
        lines += ["", note.strip()]
    lines.append(_END)
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Put the section into the results file, replacing an earlier one."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if _BEGIN in current and _END in current:
        head, rest = current.split(_BEGIN, 1)
        tail = rest.split(_END, 1)[1]
        path.write_text(head + text + tail)
    else:
        path.write_text(current.rstrip("\n") + "\n\n" + text + "\n")


def main() -> int:
    """Parse the options, run, print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        type=lambda t: t.split(","),
        default=["pdproxy", "aiohttp-bare"],
        help=f"comma-separated, from: {', '.join(TARGETS)}",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda t: [int(c) for c in t.split(",")],
        default=[1, 16, 64],
    )
    parser.add_argument("--duration", type=int, default=3, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--proxy-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a directory holding another pdsupervisord package (say, a copy "
        "of the last commit's): adds target pdproxy-baseline, run from it",
    )
    parser.add_argument("--logdir", type=Path, default=Path("/tmp/pdproxy-bench"))
    parser.add_argument(
        "--results",
        type=Path,
        help="write (or replace) the proxy section of this file, e.g. bench/RESULTS.md",
    )
    parser.add_argument(
        "--note", type=Path, help="a markdown file appended to that section"
    )
    args = parser.parse_args()
    if args.baseline is not None:
        TARGETS["pdproxy-baseline"] = _baseline
        args.targets.append("pdproxy-baseline")
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {list(TARGETS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (apt-get install wrk)")

    args.logdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env_before = environment()
    samples = run(args, args.logdir)
    print(table(samples, args.targets))
    if args.results is not None:
        note = args.note.read_text() if args.note else ""
        write_section(args.results, section(samples, args, env_before, note))
    print(f"\n{time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in samples], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
