"""Rank-0 metrics sinks: ``metrics.jsonl`` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

# Peak dense bf16 TFLOP/s by device-name fragment, for MFU.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "V100": 125.0}


def peak_tflops(device_name: str) -> float | None:
    for fragment, peak in _PEAK_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None


def _complete_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each finished line of a metrics file with its record. The text after the last newline is left out:
    it is a line a live run is still writing, or one a killed run cut short."""
    finished = path.read_text(errors="replace").split("\n")[:-1]
    pairs = []
    for number, line in enumerate(finished, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = e.msg
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(
                f"{path}:{number}: not a metrics record (a JSON object with an integer 'step'): {line[:80]!r}; "
                "delete or repair that line"
            )
        pairs.append((line, record))
    return pairs


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, also while a run is appending to it; ValueError naming the file
    and line for a line that is not a record."""
    return [record for _, record in _complete_lines(path)]


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a resumed run re-logs them from its checkpoint), and a last line
    a killed run left unfinished."""
    if not path.exists():
        return
    kept = [line for line, record in _complete_lines(path) if record["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Writes metrics on rank 0 only; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            truncate_after(self.path, resume_step)
            # purge_step hides events a killed run wrote after its last checkpoint
            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def cut_back(self, step: int) -> None:
        """Drop what was logged after ``step``, as a resume from there does: a rewound run logs those
        steps again."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        assert self._tb is not None
        self._tb.close()
        truncate_after(self.path, step)
        self._tb = SummaryWriter(str(self.path.parent / "tb"), purge_step=step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        assert self._tb is not None
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(_tb_tag(key), value, step)
        self._tb.flush()

    def log_spec(self, spec_dict: dict[str, Any], hparams: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._tb is not None
        self._tb.add_text("spec", "```yaml\n" + yaml.safe_dump(spec_dict, sort_keys=False) + "```", 0)
        self._tb.add_hparams(hparams, {}, run_name=".")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tb_tag(key: str) -> str:
    group = "val" if key.startswith("val_") else "train"
    return f"{group}/{key}"
