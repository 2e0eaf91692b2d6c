"""What the force-centric design trades away, measured: non-conservativeness of a model's
forces (:mod:`forcenet.physics.conservation`) and NVE molecular dynamics checked by the
oracle (:mod:`forcenet.physics.md`)."""
