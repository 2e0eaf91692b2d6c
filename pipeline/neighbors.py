"""Stage ``neighbors``: periodic neighbor lists of every frame, with ``graph.cutoff`` and
``graph.max_neighbors``, keyed like the frames.

    python -m pipeline.neighbors data/lmdb data/graphs
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import stage
from pipeline.params import load_params


def main(argv: Sequence[str] | None = None) -> None:
    from forcenet.data.graph_build import build_graphs

    p = stage.parser(__doc__)
    p.add_argument("frames", type=Path, help="LMDB frame root (output of preprocess)")
    p.add_argument("out", type=Path, help="graph root: OUT/SPLIT/K.lmdb")
    args = p.parse_args(argv)
    params = load_params(args.params)
    g = params.graph
    stage.echo_json(
        build_graphs(
            args.frames,
            args.out,
            cutoff=g.cutoff,
            max_neighbors=g.max_neighbors,
            workers=params.preprocess.workers,
        )
    )


if __name__ == "__main__":
    stage.run(main)
