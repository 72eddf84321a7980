"""Test seam: ``python -m tests.distributed.spiky SPEC ...`` runs ``bigtx.train`` with the loss, and so the
gradients, of chosen training micro-batches multiplied: $BIGTX_TEST_SPIKE is ``BATCH:FACTOR,...``, BATCH
counting each rank's training micro-batches from 1 (a position in the data: a rewind that skips it no
longer meets it), FACTOR a float or ``nan``. Only tests start it; bigtx itself reads no such variable."""

from __future__ import annotations

import os
import sys
from typing import Any

from bigtx import train


def main() -> int:
    spikes = dict(item.split(":") for item in os.environ["BIGTX_TEST_SPIKE"].split(","))
    factors = {int(batch): float(factor) for batch, factor in spikes.items()}
    loss_of = train.micro_batch_loss

    def spiky(job: train.Job, *args: Any) -> Any:
        loss, values = loss_of(job, *args)
        factor = factors.get(job.train_loader.stats()["batches"])
        return (loss, values) if factor is None else (loss * factor, values * factor)

    train.micro_batch_loss = spiky
    return train.main()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as bigtx.train does: no interpreter teardown after a failed collective
