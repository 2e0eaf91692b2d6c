"""Regenerate tests/models/golden.json (seeded outputs of every tiny model).

Run after an *intended* change of a model's initialisation or forward pass, check the diff,
and commit it with the change:

    .venv/bin/python tests/models/make_golden.py            # all registered models
    .venv/bin/python tests/models/make_golden.py gns schnet  # only these
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # conftest helpers, the forcenet package

from conftest import MODEL_NAMES, golden_outputs, tiny_slabs  # noqa: E402

GOLDEN = Path(__file__).with_name("golden.json")


def main(names: list[str]) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    slabs = tiny_slabs()
    for name in names or MODEL_NAMES:
        golden[name] = golden_outputs(name, slabs)
        print(f"{name}: {golden[name]['forces_abs_sum']:.6f} (sum |F|)")
    tmp = GOLDEN.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
    tmp.replace(GOLDEN)


if __name__ == "__main__":
    main(sys.argv[1:])
