"""The fixed mmap threshold each rank sets (``bigtx.distributed.cap_mmap_threshold``)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from bigtx import distributed

_FREED = """
import resource, sys, torch
from bigtx.distributed import cap_mmap_threshold
print(cap_mmap_threshold())
# a 24 MiB tensor, freed, raises glibc's dynamic threshold; the 8 MiB tensors after it then come
# from the heap and stay resident when freed, unless the threshold is fixed
big = torch.empty(24 << 20, dtype=torch.uint8).fill_(1)
del big
kept = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(16)][::2]
print(int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_tensors_leave_the_process() -> None:
    def resident(cap: bool) -> tuple[str, int]:
        code = _FREED if cap else _FREED.replace("print(cap_mmap_threshold())", "print('unset')")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    (flag, capped), (_, dynamic) = resident(True), resident(False)
    assert flag == "True"
    # half of the 16 x 8 MiB tensors were freed: 64 MiB that only the fixed threshold gives back
    assert dynamic - capped > 48 << 20, (dynamic, capped)


def test_a_no_op_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert distributed.cap_mmap_threshold() is False
