"""Soak: many sequential requests against the served CPU default; resident memory, processes,
file descriptors and shared memory of the server, its Python stubs and the rank workers.

    python benchmarks/soak.py [--requests 200] [--baseline-after 20] [--ranks 2] [--size 128] [--steps 2]
                              [--stream-every 2] [--cancel-every 10] [--out docs/soak.md]

Every ``--stream-every``-th request goes through the streaming model ``pipeline_stream`` (gRPC, a
preview at every step) instead of the ``pipeline`` ensemble (HTTP), and every ``--cancel-every``-th
one is a longer stream cancelled after its first step.

Target: after the first ``--baseline-after`` requests, no process grows its resident memory by more
than 5 %, and no process, file descriptor or /dev/shm region is leaked.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import model_or_tiny  # also puts the repository root on sys.path


def snapshot(pgid: int) -> dict:
    from python_backend.serving.server import group_members

    processes = {}
    for pid in group_members(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().rsplit("/", 1)[-1]
            processes[pid] = {"rss_mib": rss_kib / 1024, "fds": fds, "name": name}
        except (OSError, StopIteration):
            continue  # the process exited while we looked
    shm = len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else 0
    return {"processes": processes, "shm": shm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--baseline-after", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stream-every", type=int, default=2, help="0: no streamed requests")
    parser.add_argument("--cancel-every", type=int, default=10, help="0: no cancelled streams")
    parser.add_argument("--out", type=Path, default=Path("docs/soak.md"))
    args = parser.parse_args()

    import threading

    from python_backend.client import StreamCancelled, generate, generate_stream
    from python_backend.serving.repository import serve_repository
    from python_backend.serving.settings import ServingSettings

    model = model_or_tiny(args.model)
    settings = ServingSettings(model_dir=str(Path(model).resolve()), ranks=args.ranks, split_cfg=False,
                               sizes=f"{args.size}x{args.size}", default_steps=args.steps,
                               default_height=args.size, default_width=args.size)
    shm_before = len(os.listdir("/dev/shm"))
    started = time.perf_counter()
    with serve_repository(settings, Path(tempfile.mkdtemp())) as server:
        url = server.urls["http"]
        counts = {"pipeline": 0, "streamed": 0, "cancelled": 0}
        for i in range(args.requests):
            if args.cancel_every and (i + 1) % args.cancel_every == 0:
                stop = threading.Event()
                try:
                    generate_stream(server.urls["grpc"], f"soak request {i}", seed=i, steps=10 * args.steps,
                                    on_step=lambda message: stop.set(), stop=stop)
                except StreamCancelled:
                    counts["cancelled"] += 1
            elif args.stream_every and (i + 1) % args.stream_every == 0:
                generate_stream(server.urls["grpc"], f"soak request {i}", seed=i, preview_every=1)
                counts["streamed"] += 1
            else:
                generate(url, f"soak request {i}", seed=i)
                counts["pipeline"] += 1
            if i + 1 == args.baseline_after:
                baseline = snapshot(server.pgid)
            if (i + 1) % 50 == 0:
                print(f"{i + 1} requests in {time.perf_counter() - started:.0f} s", flush=True)
        final = snapshot(server.pgid)
        pgid = server.pgid
        deadline = time.monotonic() + 10  # a cancelled stream's client leaves before the server has cleaned up
        while any(server.progress_dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        progress_left = sorted(p.name for p in server.progress_dir.iterdir())
        markers_left = sorted(p.name for p in server.cancel_dir.iterdir())
    from python_backend.serving.server import group_members

    left = group_members(pgid)
    shm_after = len(os.listdir("/dev/shm"))

    rows, worst = [], 0.0
    for pid, before in baseline["processes"].items():
        after = final["processes"].get(pid)
        if after is None:
            rows.append((pid, before["name"], before["rss_mib"], None, None, before["fds"], None))
            continue
        growth = after["rss_mib"] / before["rss_mib"] - 1
        worst = max(worst, growth)
        rows.append((pid, before["name"], before["rss_mib"], after["rss_mib"], growth, before["fds"], after["fds"]))
    new_processes = sorted(set(final["processes"]) - set(baseline["processes"]))
    lines = [
        "# Soak",
        "",
        f"{args.requests} sequential requests against the served embedded model ({args.ranks} CPU ranks, "
        f"{args.size}x{args.size}, {args.steps} steps, a different prompt and seed each): {counts['pipeline']} "
        f"through the `pipeline` ensemble over HTTP, {counts['streamed']} streamed from `pipeline_stream` over gRPC "
        f"with a preview at every step, {counts['cancelled']} longer streams ({10 * args.steps} steps) cancelled "
        f"after their first step; {time.perf_counter() - started:.0f} s in all. Baseline after request "
        f"{args.baseline_after}. Produced by:",
        "",
        "```",
        f"python benchmarks/soak.py --requests {args.requests} --baseline-after {args.baseline_after} "
        f"--ranks {args.ranks} --size {args.size} --steps {args.steps} --stream-every {args.stream_every} "
        f"--cancel-every {args.cancel_every}",
        "```",
        "",
        "| pid | process | RSS at baseline (MiB) | RSS at end (MiB) | growth | fds at baseline | fds at end |",
        "|---|---|---|---|---|---|---|",
    ]
    for pid, name, before, after, growth, fds_before, fds_after in rows:
        lines.append(f"| {pid} | {name} | {before:.0f} | {'gone' if after is None else f'{after:.0f}'} | "
                     f"{'-' if growth is None else f'{growth * 100:+.1f} %'} | {fds_before} | {fds_after} |")
    lines += [
        "",
        f"- Largest resident-memory growth after the baseline: **{worst * 100:+.1f} %** (target: at most +5 %).",
        f"- Processes started after the baseline: {len(new_processes)}; processes of the server's group left "
        f"after it stopped: {len(left)}.",
        f"- /dev/shm entries: {shm_before} before the server, {baseline['shm']} at baseline, {final['shm']} at the "
        f"end, {shm_after} after it stopped.",
        f"- Progress folders left by streams: {len(progress_left)}; cancel markers left: {len(markers_left)}.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
