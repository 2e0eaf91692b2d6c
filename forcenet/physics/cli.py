"""``forcenet physics ...``: the physics checks of a trained model.

Each command lives in its own module (:mod:`forcenet.physics.cli_conservation`,
:mod:`forcenet.physics.cli_md`) as a plain function; this module registers them on
:data:`physics_app`. Heavy libraries are imported inside the commands so that
``forcenet --help`` stays fast.
"""

from __future__ import annotations

import typer

from forcenet.physics.cli_conservation import conservation
from forcenet.physics.cli_md import md

physics_app = typer.Typer(
    help=(
        "Physics checks of a trained model: how far its forces are from conservative "
        "(conservation) and energy conservation in NVE molecular dynamics judged by the "
        "oracle (md)."
    ),
    no_args_is_help=True,
)
physics_app.command("conservation")(conservation)
physics_app.command("md")(md)
