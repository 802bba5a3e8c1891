"""fedem.train.allocator: freed activation-sized blocks stay in the process, not faulted in again."""

import subprocess
import sys

import pytest

# Allocates and frees a 64 MiB tensor 31 times, touching every page, and prints the minor page faults
# of the last 30 rounds: with the default thresholds each round maps fresh zero pages (16,384 faults);
# kept, the block comes back from the heap. (The heap may still grow a few times first: a 64-byte-
# aligned request is a little larger than the block it freed, until freed neighbours coalesce.)
PROGRAM = """
import resource, sys, torch
from fedem.train.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "default")
torch.ones(16 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    torch.ones(16 << 20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    kept, count = out.stdout.split()
    return kept, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the thresholds are glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    _, default_faults = faults("default")
    kept, kept_faults = faults("keep")
    assert kept == "True"
    per_round = (64 << 20) // 4096  # pages
    assert default_faults >= 29 * per_round  # the default: every round faults its 64 MiB in again
    assert kept_faults <= 10 * per_round  # kept: measured 1 to 6 rounds' worth, the heap growing
