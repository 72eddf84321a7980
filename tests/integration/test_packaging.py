"""bigtx installed, not run from the checkout: a wheel in a fresh venv, and an editable install.

Both are built offline from a copy of the sources (no build isolation: setuptools comes from the
test's own environment). The fresh venvs see the test environment's dependencies through a ``.pth``
line naming its site-packages; ``.pth`` files inside a folder added that way are not read, so the
editable install of the test environment stays switched off there and ``import bigtx`` can only find
the install under test. Every command runs from a folder outside both the checkout and the copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.slow

# What the build reads: pyproject.toml names README.md as the long description.
SOURCES = ("pyproject.toml", "README.md", "bigtx", "ds_configs", "launchers")


def copy_sources(dest: Path) -> Path:
    """The files the build needs, without the checkout's build/, *.egg-info or caches."""
    dest.mkdir()
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=120
    )


def check(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = run(cmd, cwd, env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def clean_env() -> dict[str, str]:
    """This environment without anything that would point the fresh venv at the checkout."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "VIRTUAL_ENV", "BIGTX_DS_CONFIGS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def fresh_venv(root: Path) -> Path:
    """A venv without pip or packages; returns its python."""
    check([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    return root / "bin" / "python"


def install_wheel(python: Path, wheel: Path) -> None:
    """Install ``wheel`` into ``python``'s venv with this environment's pip (the venv has none)."""
    pip = [sys.executable, "-m", "pip", "--python", python]
    check([*pip, "install", "-q", "--no-deps", "--no-index", wheel], wheel.parent)


def share_dependencies(python: Path) -> None:
    """Make torch, deepspeed, ... of this environment importable in ``python``'s venv (after the install:
    pip would otherwise see this environment's bigtx metadata there)."""
    site = Path(check([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], python.parent).strip())
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))


def bigtx_location(python: Path, cwd: Path) -> Path:
    return Path(check([python, "-c", "import bigtx; print(bigtx.__file__)"], cwd).strip())


def show_deepspeed(bigtx: list[str], base: str, cwd: Path, env: dict[str, str] | None = None) -> dict:
    out = check([*bigtx, "config", "show", "tiny", f"--set=deepspeed.base={base}", "--deepspeed"], cwd, env)
    return json.loads(out)


def render_sbatch(bigtx: list[str], run_dir: Path, cwd: Path) -> str:
    check(
        [
            *bigtx,
            "launch",
            "slurm",
            "tiny",
            "--nodes",
            "2",
            "--gpus-per-node",
            "1",
            "--no-gres",
            f"--set=run.dir={run_dir}",
        ],
        cwd,
    )
    return (run_dir / "launch" / "bigtx-tiny.sbatch").read_text()


def assert_zero2_base(cfg: dict) -> None:
    """The settings only ds_configs/zero2.json has (the spec has no field for them) are in ``cfg``."""
    base = json.loads((REPO / "ds_configs" / "zero2.json").read_text())["zero_optimization"]
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == base["reduce_bucket_size"] == 50_000_000
    assert zero["allgather_bucket_size"] == 50_000_000
    assert zero["overlap_comm"] is True


def assert_rendered(script: str) -> None:
    assert script.startswith("#!"), script[:200]
    assert "#SBATCH --nodes=2" in script
    assert "{{" not in script  # every field of the template was filled


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_sources(tmp_path_factory.mktemp("pkg") / "src")


def test_wheel_ships_its_files_and_runs_from_anywhere(sources: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    check(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            ".",
            "-w",
            dist,
        ],
        sources,
    )
    (wheel,) = dist.glob("bigtx-*.whl")

    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "bigtx").rglob("*.py")}
    expected |= {f"bigtx/presets/{p.name}" for p in (REPO / "bigtx" / "presets").glob("*.yaml")}
    expected |= {f"bigtx/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")}
    expected |= {f"bigtx/launchers/slurm/{p.name}" for p in (REPO / "launchers" / "slurm").glob("*.tmpl")}
    assert shipped == expected, f"missing {sorted(expected - shipped)}, unexpected {sorted(shipped - expected)}"

    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    install_wheel(python, wheel)
    share_dependencies(python)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site_bigtx = bigtx_location(python, elsewhere).parent
    assert site_bigtx.is_relative_to(venv), f"import bigtx found {site_bigtx}, not the wheel installed in {venv}"

    module, script = [python, "-m", "bigtx"], [venv / "bin" / "bigtx"]
    assert_zero2_base(show_deepspeed(module, "zero2", elsewhere))
    assert_rendered(render_sbatch(script, tmp_path / "run", elsewhere))
    presets = check([*script, "config", "presets"], elsewhere).split()
    assert presets == sorted(p.stem for p in (REPO / "bigtx" / "presets").glob("*.yaml"))
    assert "tiny" in presets

    # an unknown name lists the bases the wheel ships, and where they are
    bad = run([*module, "config", "show", "tiny", "--set=deepspeed.base=zero9", "--deepspeed"], elsewhere)
    assert bad.returncode == 2, bad.stderr
    assert "['zero1', 'zero2', 'zero3', 'zero3_offload']" in bad.stderr
    assert str(site_bigtx / "ds_configs") in bad.stderr

    # $BIGTX_DS_CONFIGS still replaces the shipped folder
    own = tmp_path / "own-bases"
    own.mkdir()
    (own / "zero2.json").write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1234}}))
    cfg = show_deepspeed(module, "zero2", elsewhere, {**clean_env(), "BIGTX_DS_CONFIGS": str(own)})
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1234
    assert "allgather_bucket_size" not in cfg["zero_optimization"]


def test_editable_install_finds_the_files_in_the_checkout(sources: Path, tmp_path: Path) -> None:
    # pip install -e calls this PEP 660 hook; called directly, the build needs no pip in the fresh venv
    dist = tmp_path / "dist"
    hook = "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])"
    check([sys.executable, "-c", hook, dist], sources)
    (wheel,) = dist.glob("bigtx-*.whl")

    python = fresh_venv(tmp_path / "venv")
    install_wheel(python, wheel)
    share_dependencies(python)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert bigtx_location(python, elsewhere).resolve() == (sources / "bigtx" / "__init__.py").resolve()

    module = [python, "-m", "bigtx"]
    assert_zero2_base(show_deepspeed(module, "zero2", elsewhere))
    assert_rendered(render_sbatch(module, tmp_path / "run", elsewhere))
