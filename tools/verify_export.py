"""Export a checkpoint to Hugging Face while measuring memory, then verify the result.

    python tools/verify_export.py RUN_DIR_OR_CHECKPOINT --out DIR [--dtype bf16] [--max-shard-size 5GB]
                                  [--tag T] [--no-verify]

Prints the memory the export added at its peak next to the size of one copy of the model in the
output precision:

- anonymous: tensors the export allocated (what has to fit in RAM);
- file-backed: pages of the memory-mapped checkpoint read so far (the kernel drops them under
  pressure; they are the page cache, not a copy);
- peak RSS: the kernel's high-water mark of both together.

Anonymous and file-backed peaks are sampled every millisecond from /proc/self/status (Linux), so
they can miss a peak shorter than that; the RSS high-water mark cannot. Then runs the checks of
`bigtx export hf --verify` (logits and greedy generation against transformers).
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path

import transformers  # noqa: F401  (imported before the baseline: library code is not the export's memory)

from bigtx.export import export_hf, open_source, verify_hf_export


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler:
    """Highest RssAnon and RssFile seen while the block runs."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon = max(self.anon, _status_kib("RssAnon") * 1024)
            self.file = max(self.file, _status_kib("RssFile") * 1024)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()

    source = open_source(Path(args.source), args.tag)
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype]
    one_copy = source.spec.model.num_params() * itemsize
    base_anon, base_file = _status_kib("RssAnon") * 1024, _status_kib("RssFile") * 1024
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakSampler() as peak:
        report = export_hf(source, Path(args.out), args.dtype, args.max_shard_size, overwrite=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    mb = 1e6
    print(f"source: {source.describe()}")
    print(f"export: {report.architecture}, {args.dtype}, {len(report.files)} file(s), {report.seconds:.1f}s")
    print(f"one copy of the model in {args.dtype}: {one_copy / mb:,.0f} MB")
    print(f"added at peak: anonymous {(peak.anon - base_anon) / mb:,.0f} MB, ", end="")
    print(f"file-backed (mmap'd checkpoint) {(peak.file - base_file) / mb:,.0f} MB, ", end="")
    print(f"RSS high-water {(peak_rss - base_rss) / mb:,.0f} MB")
    if not args.no_verify:
        check = verify_hf_export(source, report.out, args.dtype)
        for line in check.lines():
            print(f"verify: {line}")
        return 0 if check.ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
