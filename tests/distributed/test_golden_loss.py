"""Golden per-step losses of a fixed tiny fp32 run on 2 CPU ranks.

The other tests compare runs with each other; a numerics change that shifts every run alike (the
model, the loss, the data order, DeepSpeed's optimizer path) passes them all. This one compares with
numbers committed under tests/golden/. When such a change is intended, regenerate them on purpose:

    python -m tests.distributed.test_golden_loss --write

and say why in the commit. One thread per rank, so the numbers do not depend on the core count.
They do depend, in the last bits of fp32, on the CPU: PyTorch's kernels sum in another order with
AVX-512 than with AVX2 (seen: 5.0645931 against 5.0645928 at step 6, a relative 5e-8). So the losses
are compared to a relative 1e-6, a hundred times that and far below any real change (a different
data order, init or optimizer step moves the loss by 1e-3 or more). Runs compared with each other on
one machine (exact resume, the ZeRO stages) stay bit-exact.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import build_byte_shards, tiny_overrides, train, train_records

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_fp32_zero2_2ranks.json"
STEPS = 20
RELATIVE = 1e-6
OVERRIDES = [f"train.max_steps={STEPS}", "precision=fp32", "zero.stage=2", "train.eval_every=0", "train.log_every=1"]


def losses_of_a_fresh_run(shards: Path, work: Path) -> dict[str, float]:
    run_dir = work / "run"
    train("tiny", tiny_overrides(run_dir, shards, *OVERRIDES), 2, work / "logs", env={"OMP_NUM_THREADS": "1"})
    return {str(step): record["loss_step"] for step, record in sorted(train_records(run_dir).items())}


@pytest.mark.slow
def test_losses_equal_the_golden_file(tmp_path: Path, byte_shards: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    got = losses_of_a_fresh_run(byte_shards, tmp_path)
    assert list(got) == [str(s) for s in range(1, STEPS + 1)]
    differ = [
        f"step {s}: {got[s]!r} != golden {golden['losses'][s]!r}"
        for s in got
        if abs(got[s] - golden["losses"][s]) > RELATIVE * abs(golden["losses"][s])
    ]
    assert not differ, (
        "per-step losses differ from the golden file (regenerate only for an intended numerics change: "
        "python -m tests.distributed.test_golden_loss --write):\n  " + "\n  ".join(differ[:5])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="(Re)write the golden per-step losses.")
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        losses = losses_of_a_fresh_run(build_byte_shards(work / "shards"), work)
    text = json.dumps({"spec": "tiny", "overrides": OVERRIDES, "ranks": 2, "losses": losses}, indent=1) + "\n"
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
