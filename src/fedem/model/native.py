"""The SSD scan's forward as a compiled C loop (`ssd_forward.c`), built at first use on this machine.

`fedem.model.ssd.ChunkedScan` runs on it when it can: float32 on a CPU, head_dim, state size and
chunk size multiples of 4, chunk size ≤ 128. That is every prompt-sized forward outside training —
evaluation, generation prefill, the hub's scoring. The torch code does the same algebra as a dozen
tensor passes; the C loop does one chunk and head at a time in cache (measured in docs/design.md).

Building. The first call compiles `ssd_forward.c` with the C compiler Python was built with (`CC`
in the environment overrides it), `-O3 -march=native` and the three sizes as constants, into
`$XDG_CACHE_HOME/fedem/native/` (default `~/.cache`) under a name hashing the source, the flags and
this CPU, written atomically; later calls and processes load it (~1 s to compile). Where there is no
compiler, or it fails (one warning), or `FEDEM_NATIVE=0`, `usable` says no and the torch code runs:
the results agree to float32 rounding (tests/model/test_native.py).

Threads. ctypes releases the GIL, so the batch's rows (or, for one row, its heads) are split over
`torch.get_num_threads()` Python threads, each running the loop on its own share.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

Tensor = torch.Tensor
log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ssd_forward.c")
# 512-bit vectors where the CPU has them: gcc's -march=native prefers 256 on recent Xeons, which ran
# the loop 1.5× slower here. No -ffast-math: linked into a shared object it can switch the whole
# process's float mode (flush-to-zero).
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fPIC", "-shared")
MAX_CHUNK = 128


def _enabled() -> bool:
    return os.environ.get("FEDEM_NATIVE", "1") != "0"


def _compiler() -> str | None:
    configured = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(configured) or shutil.which("cc")


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (not its clock, which /proc/cpuinfo reports live)."""
    try:
        first = Path("/proc/cpuinfo").read_text(encoding="utf-8").split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags")))


def _cache_dir() -> Path:
    """`$XDG_CACHE_HOME/fedem/native` (default `~/.cache`), or a folder in the temporary directory
    where that cannot be created (a read-only home)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedem" / "native"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:
        return Path(tempfile.gettempdir()) / f"fedem-native-{os.getuid()}"


@cache
def _library(head_dim: int, state_size: int, chunk_size: int) -> ctypes.CDLL | None:
    """The compiled loop for these sizes, building it if no process has; None (and one warning) if
    it cannot be built or loaded."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: the SSD scan's forward runs as torch code")
        return None
    defines = (f"-DP={head_dim}", f"-DN={state_size}", f"-DQ={chunk_size}")
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(encoding="utf-8"), compiler, *FLAGS, *defines, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"ssd_forward_{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as work:
                built = Path(work) / target.name
                subprocess.run(
                    [compiler, *FLAGS, *defines, str(SOURCE), "-o", str(built), "-lm"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                built.replace(target)  # atomic: another process sees the whole file or none
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        first_line = (detail.strip().splitlines() or [""])[0]
        log.warning("could not build the SSD scan's C loop (%s): it runs as torch code", first_line)
        return None
    library.ssd_forward.restype = ctypes.c_int
    library.ssd_forward.argtypes = [
        ctypes.c_long,
        *(ctypes.c_int,) * 2,
        *(ctypes.c_void_p,) * 9,
        *(ctypes.c_int,) * 4,
    ]
    return library


def builds(head_dim: int, state_size: int, chunk_size: int) -> bool:
    """Whether the C loop for these sizes is built here, building it if need be."""
    return _library(head_dim, state_size, chunk_size) is not None


@cache
def _pool(threads: int, process: int) -> ThreadPoolExecutor:
    """Worker threads for this process: a forked child gets its own (its parent's threads are gone)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fedem-ssd")


def usable(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, initial: Tensor | None, chunk_size: int
) -> bool:
    """Whether `forward` runs these inputs (`fedem.model.ssd`'s shapes, before chunking): float32 on a
    CPU, sizes the loop was written for, `FEDEM_NATIVE` not 0, and the loop builds here."""
    head_dim, state_size = x.shape[-1], B.shape[-1]
    tensors = (x, delta, A, B, C) + (() if initial is None else (initial,))
    return (
        _enabled()
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and head_dim % 4 == 0
        and state_size % 4 == 0
        and chunk_size % 4 == 0
        and chunk_size <= MAX_CHUNK
        and builds(head_dim, state_size, chunk_size)
    )


def forward(
    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, initial: Tensor | None, keep_states: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The scan of inputs that are `usable`, in `fedem.model.ssd`'s chunked layout (`to_chunks`, which
    pads the length to whole chunks): x (b, c, Q, h, p), Δ (b, c, Q, h), A (h,), B and C
    (b, c, Q, g, n), initial (b, h, p, n) or None. Returns y (b, c, Q, h, p), the states entering each
    chunk (b, c, h, p, n; None unless `keep_states`, which a backward needs) and the final state
    (b, h, p, n)."""
    batch, chunks, chunk_size, heads, head_dim = x.shape
    groups, state_size = B.shape[-2:]
    library = _library(head_dim, state_size, chunk_size)
    assert library is not None, "call `usable` first"
    inputs = [t.contiguous() for t in (x, delta, A, B, C)]
    y = torch.empty_like(inputs[0])
    states_in = x.new_empty((batch, chunks, heads, head_dim, state_size)) if keep_states else None
    final = x.new_empty((batch, heads, head_dim, state_size))
    buffers = (*inputs, None if initial is None else initial.contiguous(), y, states_in, final)
    pointers = [None if t is None else t.data_ptr() for t in buffers]

    def run(rows: tuple[int, int], head_range: tuple[int, int]) -> None:
        if library.ssd_forward(chunks * chunk_size, heads, groups, *pointers, *rows, *head_range):
            raise MemoryError("the SSD scan's C loop could not allocate its states")

    # The batch's rows over the threads, or for a batch shorter than that, its heads.
    threads = max(1, torch.get_num_threads())
    by_rows = batch >= threads or heads < 2
    total = batch if by_rows else heads
    parts = [(total * i // threads, total * (i + 1) // threads) for i in range(threads)]
    shares = [((lo, hi), (0, heads)) if by_rows else ((0, batch), (lo, hi)) for lo, hi in parts if hi > lo]
    if len(shares) == 1:
        run(*shares[0])
    else:
        for future in [_pool(threads, os.getpid()).submit(run, *share) for share in shares]:
            future.result()
    return y, states_in, final
