"""``forcenet physics ...``: the physics checks of a trained model.

Each command lives in its own module (:mod:`forcenet.physics.cli_conservation`,
:mod:`forcenet.physics.cli_md`), which registers itself on :data:`physics_app`; heavy
libraries are imported inside the commands so that ``forcenet --help`` stays fast.
"""

from __future__ import annotations

import typer

physics_app = typer.Typer(
    help=(
        "Physics checks of a trained model: how far its forces are from conservative "
        "(conservation) and energy conservation in NVE molecular dynamics judged by the "
        "oracle (md)."
    ),
    no_args_is_help=True,
)

# the command modules register on physics_app when imported
from forcenet.physics import cli_conservation, cli_md  # noqa: E402, F401
