"""Hub throughput over loopback: lease round trips per second, and upload and download speed of a big file.

A real hub (`fedem hub serve`, SQLite and a local blob folder) runs in its own process on 127.0.0.1;
this process is the client (`fedem.client.HubClient`). Measured in one run:

- **leases**: `--clients` threads (32), each with its own donor token and HTTP connection, lease and
  release their own adapter as fast as they can for `--duration` seconds → round trips/s and latency;
  then all of them race for one adapter (every answer a 201 or a 409) → answers/s.
- **transfers** of a `--size-mb` file (200 MB, a valid safetensors file of random bytes, so that the
  hub's content check passes), next to two baselines on the same file in the same run: `sha256sum` (the
  hashing any verified transfer has to do) and a plain file copy (`shutil.copyfile`). Upload is a whole
  `push` (the client hashes the file, asks which blobs the hub lacks, streams it; the hub hashes while
  writing, fsyncs, renames, checks the safetensors header); download is a whole `pull` (stream into a
  `.part` file while hashing, rename). Goal: both at least half the `sha256sum` rate.
- **memory**: the hub's peak RSS (`VmHWM` in /proc/<pid>/status) and this process's, after a transfer
  of 1/8 of the size and after the full size: flat in the file size means the second barely grows.

All files live in a temporary folder (`--tmp`); its file system (often tmpfs, i.e. RAM) is recorded,
because it decides what "disk" means here. Results go to `<out>/hub_throughput.json` and `.md`.

    python bench/hub_throughput.py                      # 200 MB, 32 clients → bench/results/
    python bench/hub_throughput.py --size-mb 500 --duration 10
    python bench/hub_throughput.py --quick --out /tmp/b # 4 MB, 4 clients, 1 s: a smoke run
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from child_server import ChildServer, free_port
from fedem.client import HubAPIError, HubClient
from fedem.client.hub_client import sha256_file
from machine import machine_info, write_report

REPO = Path(__file__).resolve().parents[1]
HUB_PACKAGES = ("fastapi", "uvicorn", "starlette", "httpx", "sqlalchemy")
MB, MIB = 1_000_000, 1 << 20


def _status_kib(pid: int, field: str) -> int:
    """A `VmHWM:`/`VmRSS:` line of /proc/<pid>/status, in KiB (0 where /proc is missing)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _filesystem(path: Path) -> str:
    """The type of the file system holding `path` (longest matching mount point in /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        _dev, point, fstype, *_ = line.split()
        if str(path.resolve()).startswith(point) and len(point) > len(best):
            best, kind = point, fstype
    return kind


class Server(ChildServer):
    """`fedem hub serve` in a child process; its first-start admin token is read from its stdout."""

    def __init__(self, root: Path, log_path: Path, max_file_bytes: int, *options: str) -> None:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "fedem.cli",
            "hub",
            "serve",
            "--root",
            str(root),
            "--port",
            str(port),
        ]
        command += ["--max-file-bytes", str(max_file_bytes), *options]  # options: more `serve` flags
        super().__init__(command, port, log_path, REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed before the server starts listening
        token = re.search(r"(fedem_\S+)", line)
        if token is None:
            self.stop()
            raise RuntimeError(f"no admin token from the hub: {line!r}\n{self.log_tail()}")
        self.token = token.group(1)
        self.wait_healthy("/healthz", 60, "the hub")

    def peak_rss_mib(self) -> float:
        return _status_kib(self.proc.pid, "VmHWM") / 1024


def lease_loop(
    clients: list[HubClient], adapters: list[str], duration: float, hub_pid: int
) -> dict[str, Any]:
    """Every client leases and releases its adapter (or, with one adapter for all, races for it).
    CPU time of the hub and of this process tells which side limits the rate."""
    latencies: list[list[float]] = [[] for _ in clients]
    answers = {"201": 0, "409": 0}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(len(clients) + 1)
    stop_at = [0.0]

    def work(i: int) -> None:
        try:
            loop(i)
        except BaseException as err:  # re-raised below, in the bench's own thread
            errors.append(err)

    def loop(i: int) -> None:
        client, adapter = clients[i], adapters[i % len(adapters)]
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                lease = client.lease(adapter)
            except HubAPIError as err:
                if err.status != 409:
                    raise
                with lock:
                    answers["409"] += 1
                continue
            client.release(lease["lease_id"])
            latencies[i].append(time.perf_counter() - t0)
            with lock:
                answers["201"] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    hub_cpu, own_cpu = _cpu_seconds(hub_pid), time.process_time()
    stop_at[0] = time.perf_counter() + duration
    t0 = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - t0
    hub_cpu, own_cpu = _cpu_seconds(hub_pid) - hub_cpu, time.process_time() - own_cpu
    if errors:
        raise errors[0]
    flat = sorted(x for per in latencies for x in per)
    requests = len(flat) * 2 + answers["409"]
    return {
        "clients": len(clients),
        "adapters": len(adapters),
        "seconds": seconds,
        "round_trips": len(flat),
        "round_trips_per_s": len(flat) / seconds,
        "refused_409": answers["409"],
        "answers_per_s": requests / seconds,
        "hub_cpu_s": hub_cpu,
        "hub_cpu_ms_per_request": 1000 * hub_cpu / max(requests, 1),
        "client_cpu_s": own_cpu,
        "latency_ms_p50": 1000 * statistics.median(flat) if flat else None,
        "latency_ms_p95": 1000 * flat[int(0.95 * (len(flat) - 1))] if flat else None,
    }


def write_safetensors(path: Path, size: int) -> None:
    """A valid safetensors file (one U8 tensor) of about `size` random bytes, written 1 MiB at a time."""
    header = json.dumps({"data": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        for start in range(0, size, MIB):
            out.write(os.urandom(min(MIB, size - start)))


def best_seconds(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def transfers(admin: HubClient, server: Server, work: Path, size: int, repeats: int) -> dict[str, Any]:
    """Baselines, then push and pull of one file of `size` bytes; rates in MB/s of the file's size."""
    folder = work / f"push-{size}"
    folder.mkdir()
    path = folder / "model.safetensors"
    write_safetensors(path, size)
    nbytes = path.stat().st_size
    sha256sum = shutil.which("sha256sum")

    def hash_with_tool() -> None:
        if sha256sum:
            subprocess.run([sha256sum, str(path)], check=True, stdout=subprocess.DEVNULL)
        else:
            sha256_file(path)

    copy = work / "copy.safetensors"
    rates = {
        "sha256sum": nbytes / MB / best_seconds(hash_with_tool, repeats),
        "hashlib_1mib": nbytes / MB / best_seconds(lambda: sha256_file(path), repeats),
        "copy": nbytes / MB / best_seconds(lambda: shutil.copyfile(path, copy), repeats),
    }
    copy.unlink()
    repo = f"bench/file-{size}"
    admin.create_repo(repo, "model")
    t0 = time.perf_counter()
    pushed = admin.push(repo, folder)
    upload_s = time.perf_counter() - t0
    assert pushed.moved == ["model.safetensors"], pushed
    hub_peak_after_upload = server.peak_rss_mib()

    def pull() -> None:
        dest = work / f"pull-{size}"
        shutil.rmtree(dest, ignore_errors=True)
        done = admin.pull(repo, "v1", dest)
        assert done.bytes == nbytes, done

    download_s = best_seconds(pull, repeats)
    shutil.rmtree(work / f"pull-{size}")
    path.unlink()
    return {
        "bytes": nbytes,
        "tool": "sha256sum" if sha256sum else "hashlib (no sha256sum on PATH)",
        "mb_per_s": {**rates, "upload": nbytes / MB / upload_s, "download": nbytes / MB / download_s},
        "upload_s": upload_s,
        "download_s": download_s,
        "hub_peak_rss_mib_after_upload": hub_peak_after_upload,
        "hub_peak_rss_mib": server.peak_rss_mib(),
        "client_peak_rss_mib": _self_peak_mib(),
    }


def markdown(report: dict[str, Any]) -> str:
    m, s, lease, race = report["machine"], report["settings"], report["leases"], report["lease_race"]
    big, small = report["transfers"][-1], report["transfers"][0]
    r, g = big["mb_per_s"], report["goals"]
    lines = [
        "# Hub throughput over loopback",
        "",
        "`fedem hub serve` (SQLite, local blob folder) in its own process on 127.0.0.1, `HubClient` in the "
        f"bench process. Files in {m['tmp']} ({m['tmp_filesystem']}). Machine: {m['cpu']}, "
        f"{m['cores_usable']} usable cores, {m['memory_gib']} GiB; Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + f"; {m['date']}; load average {m['load_average_start'][0]:.2f} at start, "
        f"{m['load_average_end'][0]:.2f} at end.{' Quick (smoke) run.' if s['quick'] else ''}",
        "",
        "## Leases",
        "",
        f"{lease['clients']} clients, each leasing and releasing its own adapter for {s['duration']:.0f} s: "
        f"**{lease['round_trips_per_s']:,.0f} round trips/s** (lease + release, {lease['round_trips']:,} in "
        f"all; latency p50 {lease['latency_ms_p50']:.1f} ms, p95 {lease['latency_ms_p95']:.1f} ms). "
        f"The hub used {lease['hub_cpu_s']:.1f} s of CPU ({lease['hub_cpu_ms_per_request']:.1f} ms per "
        f"request) and the clients {lease['client_cpu_s']:.1f} s in {lease['seconds']:.1f} s.",
        f"All {race['clients']} racing for one adapter: {race['answers_per_s']:,.0f} answers/s, "
        f"{race['round_trips']:,} won leases and {race['refused_409']:,} 409s.",
        "",
        "## Transfers",
        "",
        f"A {big['bytes'] / MB:,.0f} MB file (best of {s['repeats']} for the baselines and the download; "
        "one upload, since a second would find the blob already there).",
        "",
        "| | MB/s | vs sha256sum |",
        "|---|---:|---:|",
    ]
    names = {
        "sha256sum": f"`{big['tool']}`",
        "hashlib_1mib": "hashlib, 1 MiB reads",
        "copy": "plain copy (`shutil.copyfile`)",
        "upload": "**upload** (`push`: hash, stream, hub hashes + fsyncs)",
        "download": "**download** (`pull`: stream, hash, rename)",
    }
    for key, label in names.items():
        lines.append(f"| {label} | {r[key]:,.0f} | {r[key] / r['sha256sum']:.2f} |")
    lines += [
        "",
        f"Goal upload and download ≥ 0.5 × sha256sum: upload {g['upload_vs_sha256']:.2f} "
        f"({'met' if g['upload_met'] else 'not met'}), download {g['download_vs_sha256']:.2f} "
        f"({'met' if g['download_met'] else 'not met'}).",
        "",
        "## Memory",
        "",
        "| file | hub peak RSS after upload (MiB) | … after download (MiB) | client peak RSS (MiB) |",
        "|---:|---:|---:|---:|",
    ]
    for t in report["transfers"]:
        lines.append(
            f"| {t['bytes'] / MB:,.0f} MB | {t['hub_peak_rss_mib_after_upload']:,.0f} | "
            f"{t['hub_peak_rss_mib']:,.0f} | {t['client_peak_rss_mib']:,.0f} |"
        )
    lines += [
        "",
        f"Hub peak RSS before any transfer: {report['hub_peak_rss_mib_before']:,.0f} MiB. Going from "
        f"{small['bytes'] / MB:,.0f} MB to {big['bytes'] / MB:,.0f} MB the hub's peak grew "
        f"{g['hub_growth_mib']:,.1f} MiB and the client's {g['client_growth_mib']:,.1f} MiB, for "
        f"{(big['bytes'] - small['bytes']) / MIB:,.0f} MiB more file: memory is "
        f"{'flat' if g['memory_flat'] else 'NOT flat'} in the file size.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200, help="the transfer file's size (MB)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent lease clients")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each lease loop")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for baselines and downloads")
    parser.add_argument("--quick", action="store_true", help="4 MB, 4 clients, 1 s: a smoke run")
    parser.add_argument("--tmp", type=Path, help="folder for the hub and the files (default: system tmp)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.clients, args.duration, args.repeats = 4, 4, 1.0, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    size = int(args.size_mb * MB)
    with tempfile.TemporaryDirectory(prefix="fedem-hub-bench-", dir=args.tmp) as tmp:
        work = Path(tmp)
        machine = machine_info(HUB_PACKAGES, tmp=str(work), tmp_filesystem=_filesystem(work))
        server = Server(work / "hub", work / "hub.log", max(2 * size, 4 << 30))
        try:
            admin = HubClient(server.url, server.token)
            donors = [admin.add_user(f"donor{i}", "donor")["token"] for i in range(args.clients)]
            adapters = [f"bench/adapter-{i}" for i in range(args.clients)]
            for adapter in adapters:
                admin.create_repo(adapter, "adapter")
            clients = [HubClient(server.url, token) for token in donors]
            leases = lease_loop(clients, adapters, args.duration, server.proc.pid)
            race = lease_loop(clients, adapters[:1], args.duration, server.proc.pid)
            for client in clients:
                client.close()
            hub_before = server.peak_rss_mib()
            results = [transfers(admin, server, work, n, args.repeats) for n in (max(size // 8, MIB), size)]
            admin.close()
        except BaseException:
            print(server.log_tail(), file=sys.stderr)
            raise
        finally:
            server.stop()
    machine["load_average_end"] = list(os.getloadavg())
    small, big = results
    rates = big["mb_per_s"]
    growth = big["hub_peak_rss_mib"] - small["hub_peak_rss_mib"]
    client_growth = big["client_peak_rss_mib"] - small["client_peak_rss_mib"]
    extra_mib = (big["bytes"] - small["bytes"]) / MIB
    goals = {
        "upload_vs_sha256": rates["upload"] / rates["sha256sum"],
        "download_vs_sha256": rates["download"] / rates["sha256sum"],
        "upload_met": rates["upload"] >= 0.5 * rates["sha256sum"],
        "download_met": rates["download"] >= 0.5 * rates["sha256sum"],
        "hub_growth_mib": growth,
        "client_growth_mib": client_growth,
        # flat: growing the file by X MiB grows neither peak by more than a tenth of X (plus 32 MiB slack)
        "memory_flat": max(growth, client_growth) <= 32 + 0.1 * extra_mib,
    }
    report = {
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "size_mb": args.size_mb,
            "clients": args.clients,
            "duration": args.duration,
            "repeats": args.repeats,
        },
        "leases": leases,
        "lease_race": race,
        "hub_peak_rss_mib_before": hub_before,
        "transfers": results,
        "goals": goals,
        "command": "python bench/hub_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_report(args.out, "hub_throughput", report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
