"""What a benchmark ran on, recorded beside its figures: CPU, cores, memory, library versions, thread
settings and the load when it started (a busy machine explains noisy numbers).

Torch is not imported here: a benchmark's parent process stays small, and a spawned child starts from
its parent's peak RSS (Linux keeps it across exec), which would blur the children's memory figures.
"""

import datetime
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

GIB = 1 << 30
ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "MALLOC_", "PYTORCH_", "ATEN_", "OPENBLAS_")  # they change figures


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_available() -> int:
    """Bytes the kernel reports as available (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info(packages: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """The machine and versions; `packages` adds versions beyond torch and transformers, `extra` fields."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "memory_available_gib": round(memory_available() / GIB, 1),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "packages": {p: package_version(p) for p in packages},
        "platform": platform.platform(),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line naming the machine, for the top of a results file."""
    versions = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    return (
        f"Machine: {info['cpu']}, {info['cores_usable']} usable cores, {info['memory_gib']} GiB; "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}"
        f"{', ' + versions if versions else ''}; {info['date']}; load average at start "
        f"{info['load_average_start']}."
    )


def write_report(folder: Path, name: str, report: dict[str, Any], text: str) -> None:
    """`<folder>/<name>.json` (the report) and `<folder>/<name>.md` (its Markdown `text`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / f"{name}.md").write_text(text, encoding="utf-8")
