"""Test seam: ``python -m tests.distributed.slow_rank SPEC ...`` runs ``bigtx.train`` with every batch of
rank $BIGTX_TEST_SLOW_RANK delayed by $BIGTX_TEST_SLOW_S seconds: a straggler in data loading, on purpose.
Only tests start it; bigtx itself reads neither variable."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from bigtx import train


class SlowBatches:
    """``batches``, each ``seconds`` late."""

    def __init__(self, batches: Iterator, seconds: float) -> None:
        self.batches, self.seconds = batches, seconds

    def __next__(self) -> Any:
        time.sleep(self.seconds)
        return next(self.batches)


def main() -> int:
    if os.environ["RANK"] == os.environ["BIGTX_TEST_SLOW_RANK"]:
        seconds = float(os.environ["BIGTX_TEST_SLOW_S"])
        step = train.train_step
        train.train_step = lambda job, batches, lr, beat: step(job, SlowBatches(batches, seconds), lr, beat)
    return train.main()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as bigtx.train does: no interpreter teardown after a failed collective
