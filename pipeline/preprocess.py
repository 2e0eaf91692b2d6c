"""Stage ``preprocess``: raw frames -> LMDB shards of plain arrays, one per raw shard.

python -m pipeline.preprocess data/raw data/lmdb
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline import stage
from pipeline.params import load_params


def main(argv: Sequence[str] | None = None) -> None:
    from forcenet.data.preprocess import preprocess

    p = stage.parser(__doc__)
    p.add_argument("raw", type=Path, help="raw root holding SPLIT/K.extxyz.xz")
    p.add_argument("out", type=Path, help="LMDB root: OUT/SPLIT/K.lmdb")
    args = p.parse_args(argv)
    params = load_params(args.params)
    stage.echo_json(preprocess(args.raw, args.out, workers=params.preprocess.workers))


if __name__ == "__main__":
    stage.run(main)
