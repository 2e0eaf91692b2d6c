"""Command-line options shared by the ``forcenet`` commands (one spelling and help text)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

DeviceOpt = Annotated[
    str | None,
    typer.Option(help="Torch device: cpu, cuda, cuda:1 ... (default: cuda if available)."),
]
WorkersOpt = Annotated[int, typer.Option(help="Parallel worker processes (1 = in-process).")]
OptimizerOpt = Annotated[
    Literal["lbfgs", "fire"], typer.Option(help="ASE optimizer: lbfgs or fire.")
]
