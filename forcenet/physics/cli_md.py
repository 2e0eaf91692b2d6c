"""``forcenet physics md`` (registered on :data:`forcenet.physics.cli.physics_app`)."""

from __future__ import annotations
