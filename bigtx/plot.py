"""Training curves from ``metrics.jsonl``: one PNG, several runs overlaid."""

from __future__ import annotations

from pathlib import Path

from bigtx.metrics import read_records

# (title, key, log scale) of the four panels; validation losses and distillation's CE and KD join the loss panel
PANELS = [
    ("loss", "loss", True),
    ("learning rate", "lr", False),
    ("tokens/s", "tokens_per_s", False),
    ("grad norm", "grad_norm", True),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a bigtx run directory?)")
    return read_records(path)


def val_lines(records: list[dict], x_axis: str = "step") -> dict[str, list[tuple[float, float]]]:
    """The validation points of one run by line: ``val`` from ``val_loss`` and ``val/<name>`` from each
    named source's ``val_loss/<name>``; x is the step, or the tokens trained by then."""
    tokens_at = {r["step"]: r["tokens"] for r in records if "loss" in r}
    keys = sorted({k for r in records for k in r if k.split("/")[0] == "val_loss"})
    return {
        key.replace("val_loss", "val", 1): [
            (r["step"] if x_axis == "step" else tokens_at.get(r["step"], 0), r[key]) for r in records if key in r
        ]
        for key in keys
    }


def plot_runs(run_dirs: list[Path], out: Path, x_axis: str = "step") -> Path:
    """Render loss (train, val and each named val source, and with distillation its CE and KD parts), lr,
    tokens/s and grad norm against ``x_axis`` (step or tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        train = [r for r in records if "loss" in r]
        label = run_dir.name
        for ax, (title, key, log) in zip(axes.flat, PANELS):
            points = [(r[x_axis], r[key]) for r in train if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=f"{label} train" if key == "loss" else label)
            if key == "loss":
                # the parts of the training loss: distillation's ce and kd, or the cross-entropy beside a z-loss
                for part in ("ce_loss", "kd_loss"):
                    points = [(r[x_axis], r[part]) for r in train if r.get(part) is not None]
                    if points:
                        ax.plot(*zip(*points), ":", label=f"{label} {part}")
                for name, points in val_lines(records, x_axis).items():
                    ax.plot(*zip(*points), "o--", label=f"{label} {name}")
            ax.set_title(title)
            ax.set_xlabel(x_axis)
            if log:
                ax.set_yscale("log")
    for ax in axes.flat:
        if ax.has_data():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
