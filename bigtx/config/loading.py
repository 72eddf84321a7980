"""Reading a run spec: YAML file or preset name, plus typed ``--set a.b=value`` overrides.

Every problem becomes a ``SpecError`` holding ``path.to.field: message`` lines, so the CLI can
print them and exit 2 instead of showing a traceback.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bigtx.config.spec import RunSpec


class SpecError(Exception):
    """A run spec that cannot be used; ``errors`` are ``field: message`` lines."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid run spec{where}:\n" + "\n".join(f"  {e}" for e in errors))


def preset_names() -> list[str]:
    """Names of the run-spec presets shipped in ``bigtx/presets``."""
    files = resources.files("bigtx.presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def shipped_dir(name: str) -> Path:
    """The folder ``name`` (``ds_configs``, ``launchers``) that ships with bigtx.

    An installed wheel has it inside the package (pyproject.toml maps the top-level folder there); a
    source checkout, installed editable or not, has it next to the ``bigtx`` package. The folders are
    found by path, not imported: setuptools' editable finder cannot import a data-only package that is
    mapped to a folder outside ``bigtx/``.
    """
    package = Path(__file__).resolve().parents[1]
    installed = package / name
    return installed if installed.is_dir() else package.parent / name


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{where}: YAML syntax error: {problem}"], source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError([f"{source}: the top level must be a mapping of sections, got {type(data).__name__}"], source)
    return data


def read_spec_dict(spec: str) -> tuple[dict[str, Any], str]:
    """The raw mapping of a spec given as a YAML path or a preset name, and where it came from."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise SpecError(
                [f"{spec}: no such file; give a YAML path or one of the presets: {', '.join(preset_names())}"]
            )
        return _read_yaml(path.read_text(), str(path)), str(path)
    if spec in preset_names():
        text = resources.files("bigtx.presets").joinpath(f"{spec}.yaml").read_text()
        return _read_yaml(text, f"preset {spec}"), f"preset {spec}"
    raise SpecError([f"{spec}: neither a YAML file nor a preset; presets: {', '.join(preset_names())}"])


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b=value`` overrides applied; values are parsed as YAML scalars."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError([f"--set {item}: expected KEY=VALUE, e.g. --set train.max_steps=10"])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError([f"{key}: cannot set a field below {part!r}, which is not a section"])
            node = child
        node[parts[-1]] = value
    return out


def _format_validation_error(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            # rule messages start with the field they are about ("n_heads: ...", "data.seq_len: ...")
            head, sep, rest = msg.partition(": ")
            if sep and " " not in head:
                loc = head if "." in head else ".".join(filter(None, [loc, head]))
                msg = rest
        elif err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `bigtx config schema` lists every field)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{loc or '(spec)'}: {msg}")
    return lines


def validate_spec(data: dict[str, Any], source: str = "", *, saved: bool = False) -> RunSpec:
    """Validate a raw mapping into a ``RunSpec`` or raise ``SpecError`` listing every problem.

    ``saved``: the spec was read back from a run, checkpoint or weights directory, so the paths only
    a run needs (``distill.teacher``, ``distill.source``) are not required to exist.
    """
    try:
        return RunSpec.model_validate(data, context={"saved": saved})
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc), source) from None


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    """Add SPEC and repeatable ``--set KEY=VALUE`` (``args.spec``, ``args.overrides``) as ``load_spec`` takes them."""
    parser.add_argument("spec", metavar="SPEC", help="run spec: a YAML file or a preset name (`bigtx config presets`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.max_steps=10 (repeatable; values parsed as YAML)",
    )


def load_spec(spec: str, overrides: list[str] | None = None, *, saved: bool = False) -> RunSpec:
    """Load a spec from a YAML path or preset name, apply overrides, validate (``saved``: as in ``validate_spec``)."""
    data, source = read_spec_dict(spec)
    return validate_spec(apply_overrides(data, overrides or []), source, saved=saved)


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """The fully resolved spec as plain data (what ``spec.yaml`` in the run dir holds)."""
    return spec.model_dump(mode="json")


def spec_hash(spec: RunSpec) -> str:
    """A stable hash of the resolved spec."""
    blob = json.dumps(spec_to_dict(spec), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
