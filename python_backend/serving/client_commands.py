"""``distrifusion client`` and ``distrifusion perf``: talk to a running server (``distrifusion serve``).

``client`` sends one request through the client library (``python_backend.client``) and saves the PNG.
``perf`` runs perf_analyzer against the ``pipeline`` ensemble with the packaged perf inputs and
summarises its CSV. Requests take seconds (1-5 s each on CPU), so perf_analyzer measures in windows
of a few requests with a loose stability criterion instead of its default 5-second time windows.
"""

from __future__ import annotations

import csv
import importlib.resources
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..client.infer import PROTOCOLS
from ..client.request import add_request_arguments, request_options, save_png

DEFAULT_PERF_INPUTS = Path(str(importlib.resources.files("python_backend.client") / "perf_inputs.json"))
_HOST_PORT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d+$")
_CONCURRENCY = re.compile(r"^\d+(:\d+(:\d+)?)?$")


def add_client_commands(commands) -> None:
    client = commands.add_parser("client", help="send one request to a running server and save the image")
    client.add_argument("--url", required=True, help="HOST:PORT (8000 for HTTP, 8001 for gRPC)")
    client.add_argument("--protocol", choices=PROTOCOLS, default="http")
    add_request_arguments(client)
    client.add_argument("--stream", action="store_true",
                        help="gRPC only: use the pipeline_stream model and show a progress bar per step")
    client.add_argument("--preview-every", type=int, default=0,
                        help="with --stream: a preview every N steps (0: none)")
    client.add_argument("--previews", type=Path, help="with --stream: save the previews as PNGs in this folder")
    client.set_defaults(handler=_client)

    perf = commands.add_parser("perf", help="measure throughput and latency of a running server with perf_analyzer")
    perf.add_argument("--url", required=True, help="HOST:PORT (8000 for HTTP, 8001 for gRPC)")
    perf.add_argument("--protocol", choices=PROTOCOLS, default="http")
    perf.add_argument("--model", default="pipeline")
    perf.add_argument("--concurrency", default="1:2", help="START[:END[:STEP]] concurrent requests (default 1:2)")
    perf.add_argument("--input-data", type=Path, default=DEFAULT_PERF_INPUTS,
                      help="perf_analyzer JSON input file (default: the packaged one, as in clients/perf_inputs.json)")
    perf.add_argument("--request-count", type=int, default=4,
                      help="requests per measurement window (default 4)")
    perf.add_argument("--measurement-interval", type=int, default=5000,
                      help="first measurement window in ms; it grows until --request-count requests finish (default 5000)")
    perf.add_argument("--stability-percentage", type=float, default=50.0,
                      help="allowed spread of the last 3 windows, in %% (default 50)")
    perf.add_argument("--max-trials", type=int, default=6, help="windows per concurrency before giving up (default 6)")
    perf.add_argument("--csv", type=Path, default=Path("perf.csv"), help="where the CSV report goes (default perf.csv)")
    perf.set_defaults(handler=_perf)

    demo = commands.add_parser("demo", help="a web page for a running server: prompt, settings, live progress "
                               "and previews, the image, Stop")
    demo.add_argument("--url", required=True, help="HOST:PORT of the server's gRPC endpoint (8001)")
    demo.add_argument("--host", default="127.0.0.1", help="address the page listens on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    demo.set_defaults(handler=_demo)


def _usage_error(command: str, message: str) -> int:
    print(f"distrifusion {command}: error: {message}", file=sys.stderr)
    return 2


def _check_url(url: str) -> str | None:
    if "://" in url or not _HOST_PORT.match(url):
        return f"--url must be HOST:PORT without a scheme (e.g. localhost:8000), got {url!r}"
    return None


def _client(args) -> int:
    problem = _check_url(args.url)
    for flag, value in (("--steps", args.steps), ("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            problem = problem or f"{flag} must be >= 1, got {value}"
    if args.timeout <= 0:
        problem = problem or f"--timeout must be > 0, got {args.timeout}"
    if args.stream and args.protocol != "grpc":
        problem = problem or "--stream needs --protocol grpc (Triton streams over gRPC only)"
    if not args.stream and (args.preview_every or args.previews):
        problem = problem or "--preview-every and --previews need --stream"
    if args.preview_every < 0:
        problem = problem or f"--preview-every must be >= 0, got {args.preview_every}"
    if problem:
        return _usage_error("client", problem)

    from tritonclient.utils import InferenceServerException

    from ..client import generate

    start = time.perf_counter()
    try:
        if args.stream:
            image = _stream(args)
        else:
            image = generate(args.url, args.prompt, protocol=args.protocol, **request_options(args))
    except (InferenceServerException, OSError, ValueError, TimeoutError) as error:
        print(f"distrifusion client: request failed: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, args.out)
    print(f"saved {args.out} ({image.shape[1]}x{image.shape[0]})")
    print(f"the request took {seconds:.2f} seconds over {'HTTP' if args.protocol == 'http' else 'gRPC'}")
    return 0


def _demo(args) -> int:
    problem = _check_url(args.url)
    if not 0 <= args.port <= 65535:
        problem = problem or f"--port must be 0 to 65535, got {args.port}"
    if problem:
        return _usage_error("demo", problem)
    from ..demo.app import start_demo, stop_demo

    try:
        server, thread = start_demo(args.url, args.host, args.port)
    except OSError as error:
        return _usage_error("demo", f"cannot listen on {args.host}:{args.port}: {error}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"the demo page is at {server.url} (Triton gRPC at {args.url}); Ctrl-C stops it", flush=True)
    while thread.is_alive() and not stop.wait(0.5):
        continue
    stop_demo(server)  # cancels running generations: the server frees the rank group at the next step
    print("the demo page stopped", flush=True)
    return 0


def _stream(args):
    """The image from ``pipeline_stream``, with a progress bar on stderr and the previews saved."""
    from PIL import Image
    from tqdm import tqdm

    from ..client.stream import generate_stream

    options = request_options(args)
    options.pop("model")  # --model names the one-shot model; the stream has its own
    bar = tqdm(total=args.steps, desc="denoising on the server", unit="step", file=sys.stderr, dynamic_ncols=True)
    if args.previews:
        args.previews.mkdir(parents=True, exist_ok=True)

    def on_step(message) -> None:
        bar.total = message.steps
        bar.set_postfix_str(f"{message.seconds:.1f} s, exchange wait {message.exchange_wait_seconds:.2f} s",
                            refresh=False)
        bar.update(message.step - bar.n)
        if message.preview is not None and args.previews:
            Image.fromarray(message.preview).save(args.previews / f"step_{message.step:03d}.png")

    try:
        return generate_stream(args.url, args.prompt, preview_every=args.preview_every or None, on_step=on_step,
                               **options)
    finally:
        bar.close()


def perf_analyzer_command(args, executable: str | Path = "perf_analyzer") -> list[str]:
    """perf_analyzer's argument list. ``-f`` is the CSV's file name only: run it in the CSV's folder
    (``args.csv.parent``), where it also writes one ``<model>_v<version>.<csv name>`` per composing model."""
    return [
        str(executable),
        "-m", args.model,
        "-u", args.url,
        "-i", args.protocol,
        "--concurrency-range", args.concurrency,
        "--input-data", str(Path(args.input_data).resolve()),
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(args.request_count),
        "--measurement-interval", str(args.measurement_interval),
        "--stability-percentage", f"{args.stability_percentage:g}",
        "--max-trials", str(args.max_trials),
        "-f", Path(args.csv).name,
    ]


def read_perf_csv(path: Path) -> list[dict]:
    """perf_analyzer's CSV (one row per concurrency, latencies in microseconds) as rows sorted by
    concurrency: {"concurrency", "throughput" (infer/s), "p50_ms", "p99_ms"}."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Concurrency")]
    summary = [
        {
            "concurrency": int(row["Concurrency"]),
            "throughput": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000.0,
            "p99_ms": float(row["p99 latency"]) / 1000.0,
        }
        for row in rows
    ]
    return sorted(summary, key=lambda row: row["concurrency"])


def format_perf_summary(rows: list[dict]) -> str:
    lines = [f"{'concurrency':>11}  {'infer/s':>9}  {'p50 ms':>10}  {'p99 ms':>10}"]
    for row in rows:
        lines.append(f"{row['concurrency']:>11}  {row['throughput']:>9.3f}  {row['p50_ms']:>10.1f}  {row['p99_ms']:>10.1f}")
    return "\n".join(lines)


def _check_perf_args(args) -> str | None:
    if _check_url(args.url):
        return _check_url(args.url)
    if not _CONCURRENCY.match(args.concurrency):
        return f"--concurrency must be START[:END[:STEP]], got {args.concurrency!r}"
    if not Path(args.input_data).is_file():
        return f"--input-data: no such file {args.input_data}"
    if args.request_count < 1:
        return f"--request-count must be >= 1, got {args.request_count}"
    if args.measurement_interval < 1:
        return f"--measurement-interval must be >= 1 ms, got {args.measurement_interval}"
    if args.stability_percentage <= 0:
        return f"--stability-percentage must be > 0, got {args.stability_percentage:g}"
    if args.max_trials < 3:
        return f"--max-trials must be >= 3 (stability needs 3 windows), got {args.max_trials}"
    if args.csv.suffix.lower() != ".csv":
        return f"--csv must end in .csv, got {args.csv}"
    return None


def _perf(args) -> int:
    problem = _check_perf_args(args)
    if problem:
        return _usage_error("perf", problem)

    from .perf_tools import find_perf_analyzer, perf_analyzer_environment

    csv_path = args.csv.resolve()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.unlink(missing_ok=True)  # never summarise a previous run
    started = time.time()
    try:
        executable = find_perf_analyzer()
    except FileNotFoundError as error:
        print(f"distrifusion perf: {error}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as workdir:
        command = perf_analyzer_command(args, executable)
        print("running: " + " ".join(command), flush=True)
        done = subprocess.run(command, cwd=csv_path.parent, env=perf_analyzer_environment(Path(workdir)))
    if done.returncode != 0 or not csv_path.is_file():
        print(f"distrifusion perf: perf_analyzer failed (exit status {done.returncode}); see its output above",
              file=sys.stderr)
        return 1
    print(f"\nperf_analyzer's CSV report: {csv_path}")
    composing = sorted(path for path in csv_path.parent.glob(f"*_v*.{csv_path.name}")
                       if path.stat().st_mtime >= started - 1)
    if composing:
        print("per composing model: " + ", ".join(str(path) for path in composing))
    print(format_perf_summary(read_perf_csv(csv_path)))
    return 0
