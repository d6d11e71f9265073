"""Helpers shared by the example scripts: flow families by name, output folders, tables.

Every example picks its flows by family name (``"realnvp"``, ``"spline"``, ``"maf"``,
``"iaf"``, ``"cnf"``): a builder of the registry :data:`pyro_nf.flows.FLOW_BUILDERS`
and the options the examples give it (``"spline"`` is the real NVP builder with
spline couplings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files only; never open a window

try:
    import pyro_nf
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pyro_nf
from pyro_nf.flows import flow_builder  # noqa: E402

#: The flow families the examples know, and the key of ``FLOW_BUILDERS`` each one uses.
FAMILY_BUILDERS: dict[str, str] = {
    "realnvp": "realnvp",
    "spline": "realnvp",
    "maf": "maf",
    "iaf": "iaf",
    "cnf": "cnf",
}

#: Keyword arguments each family adds to the builder call (beyond dim and context_dim).
FAMILY_OPTIONS: dict[str, dict[str, object]] = {
    "realnvp": {},
    # The builder's spline defaults (16 bins on [-5, 5], linear tails: the density
    # suite's spline study).
    "spline": {"coupling_function": "spline"},
    "maf": {},
    "iaf": {},
    # Looser tolerances than the builder's default: the examples train small models
    # on a shared CPU, where the solver's step count dominates the cost.
    "cnf": {"rtol": 1e-3, "atol": 1e-3},
}


def family_builder(family: str) -> Callable[..., pyro_nf.Flow]:
    """The :mod:`pyro_nf` builder of ``family`` (a ``ValueError`` for an unknown name)."""
    if family not in FAMILY_BUILDERS:
        raise ValueError(
            f"unknown flow family {family!r}; expected one of {sorted(FAMILY_BUILDERS)}"
        )
    return flow_builder(FAMILY_BUILDERS[family])


def build_flow(
    family: str,
    dim: int,
    context_dim: int = 0,
    num_layers: int = 4,
    hidden_dims: Sequence[int] = (64, 64),
    **options: object,
) -> pyro_nf.Flow:
    """A :class:`pyro_nf.Flow` of ``family`` over ``dim`` dimensions.

    ``num_layers`` is the number of coupling / autoregressive layers; a continuous flow
    (``cnf``) has one ODE block and uses ``hidden_dims`` for its vector field.
    """
    builder = family_builder(family)
    kwargs: dict[str, object] = {**FAMILY_OPTIONS[family], **options}
    if family != "cnf":
        kwargs.setdefault("num_layers", num_layers)
    return builder(dim=dim, context_dim=context_dim, hidden_dims=tuple(hidden_dims), **kwargs)


def output_directory(path: str | None, example: str) -> Path:
    """The folder for an example's files (``outputs/<example>/`` by default), created."""
    directory = Path(path) if path else Path("outputs") / example
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every example shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--output-dir", default=None, help="folder for figures and results (outputs/<example>/)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (for logs)"
    )
    return parser


def progress_enabled(args: argparse.Namespace) -> bool:
    """Whether to show tqdm bars: on unless ``--no-progress`` or ``NO_PROGRESS`` is set."""
    return not args.no_progress and not os.environ.get("NO_PROGRESS")


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given ``columns``; floats as %.2f."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.2f}"
        return str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: Path, payload: object) -> None:
    """Write ``payload`` as indented JSON (non-finite floats become ``null``)."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=2) + "\n")
