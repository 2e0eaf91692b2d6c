"""Users' own labelled structures (``data.source: files``) -> raw OC20-layout shards.

Any file ASE can read with energies and forces (extxyz, ``.traj``, ASE ``.db``/``.json``
databases, ...) is converted frame by frame and written with
:func:`forcenet.data.raw.write_shard`, so everything downstream of the raw layout is the
same as for OC20. Conventions for what the files may lack:

* no tags -> every atom gets tag 1 (a free "surface" atom; given tags are kept as they are);
* no constraint -> all atoms free; ``FixAtoms`` (or ``FixCartesian`` on all three axes) -> fixed;
* ``sid``: ``atoms.info["sid"]`` if present, else one running number per input file
  (a file is taken to be one structure sequence, e.g. a relaxation trajectory);
* ``fid``: ``atoms.info["fid"]`` if present, else the structure's index in its file;
* molecules (``pbc`` all False) may have a zero cell.

Refused, naming the file and structure index (:meth:`forcenet.data.frame.Frame.validate`):
missing labels, non-finite numbers, atomic numbers outside 1..100 (the models' element
tables), two atoms closer than 0.1 Å (``MIN_DISTANCE``: duplicate positions), a periodic
cell without volume.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms, FixCartesian

from forcenet.data.frame import Frame, FrameError
from forcenet.data.raw import check_regular_file, write_shard

log = logging.getLogger(__name__)

_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


class IngestError(ValueError):
    """An input structure that cannot become a training frame; names the file and index."""


def _label(atoms: Atoms, key: str, per_atom: bool) -> np.ndarray | float | None:
    """A calculator result (as stored, i.e. forces *without* constraints applied) or None."""
    results = atoms.calc.results if atoms.calc is not None else {}
    if results.get(key) is not None:
        return results[key]
    return atoms.arrays.get(key) if per_atom else atoms.info.get(key)


def _fixed(atoms: Atoms, where: str) -> np.ndarray:
    """Per-atom fixed flags [N] from ``FixAtoms`` / fully fixed ``FixCartesian``."""
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
        elif isinstance(constraint, FixCartesian):
            mask = np.broadcast_to(
                np.asarray(constraint.mask, dtype=bool), (len(constraint.index), 3)
            )
            if not mask.all():
                raise IngestError(
                    f"{where}: FixCartesian fixing only some axes is not supported "
                    "(an atom is either fixed or free)"
                )
            fixed[constraint.index] = True
        else:
            log.warning(
                "%s: constraint %s ignored (atoms stay free)", where, type(constraint).__name__
            )
    return fixed


def _integer(value: object, key: str, where: str) -> int:
    """An integer id; OC20-style strings such as ``"random1331004"`` are accepted."""
    text = str(value).removeprefix("random").removeprefix("frame")
    try:
        return int(text)
    except ValueError:
        raise IngestError(f"{where}: info[{key!r}]={value!r} is not an integer") from None


def atoms_to_frame(
    atoms: Atoms, *, where: str, sid: int, fid: int, reference_energy: float
) -> Frame:
    """One ASE structure as a validated :class:`Frame`; ``sid``/``fid`` are the defaults."""
    energy, forces = _label(atoms, "energy", False), _label(atoms, "forces", True)
    if energy is None or forces is None:
        missing = " and ".join(k for k, v in (("energy", energy), ("forces", forces)) if v is None)
        raise IngestError(f"{where}: no {missing} (training frames need both)")
    n = len(atoms)
    tags = atoms.arrays["tags"] if "tags" in atoms.arrays else np.ones(n, dtype=np.int64)
    free_energy = _label(atoms, "free_energy", False)
    frame = Frame(
        atomic_numbers=np.asarray(atoms.numbers, dtype=np.int64),
        pos=np.asarray(atoms.positions, dtype=np.float64),
        cell=np.asarray(atoms.cell.array, dtype=np.float64),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        tags=np.asarray(tags, dtype=np.int64),
        fixed=_fixed(atoms, where),
        forces=np.asarray(forces, dtype=np.float64),
        total_energy=float(energy),
        reference_energy=float(reference_energy),
        sid=_integer(atoms.info.get("sid", sid), "sid", where),
        fid=_integer(atoms.info.get("fid", fid), "fid", where),
        free_energy=None if free_energy is None else float(free_energy),
    )
    try:
        frame.validate(where)
    except FrameError as exc:
        raise IngestError(str(exc)) from exc
    return frame


def iter_file(path: Path, *, sid: int, reference_energy: float) -> Iterator[Frame]:
    """Frames of one ASE-readable file, in file order."""
    path = Path(path)
    check_regular_file(path)
    index = -1
    try:
        for index, atoms in enumerate(ase.io.iread(str(path), index=":")):
            where = f"{path}: structure {index}"
            yield atoms_to_frame(
                atoms, where=where, sid=sid, fid=index, reference_energy=reference_energy
            )
    except IngestError:
        raise
    except Exception as exc:  # ASE raises many types for unreadable files
        raise IngestError(
            f"{path}: ASE cannot read structure {index + 1} ({type(exc).__name__}: {exc})"
        ) from exc
    if index < 0:
        raise IngestError(f"{path}: no structures in the file")


def _write_split(frames: Iterator[Frame], directory: Path, shard_size: int) -> int:
    """Write ``frames`` as shards 0, 1, ... of ``shard_size`` frames; returns the count."""
    total = 0
    for k in itertools.count():
        chunk = list(itertools.islice(frames, shard_size))
        if not chunk:
            return total
        total += write_shard(directory, k, chunk)
    raise AssertionError("unreachable")  # pragma: no cover


def _swap_in(new: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``new`` (old data removed only afterwards)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def ingest_files(
    splits: Mapping[str, Sequence[Path]],
    out_dir: Path,
    *,
    shard_size: int = 5000,
    reference_energy: float = 0.0,
) -> dict[str, int]:
    """Convert users' files into ``out_dir/<split>/<k>.extxyz.xz`` + ``<k>.txt.xz``.

    ``splits`` maps a split name (e.g. ``train``, ``val_id``) to its input files;
    ``reference_energy`` (eV) is subtracted from every total energy to give the
    referenced energy. Each split folder is written under a temporary name and swapped in
    when complete, so a failure (an :class:`IngestError` naming the file and structure
    index) leaves any earlier output untouched. Returns the number of frames per split.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    file_ids = itertools.count()  # default sid: one running number per input file
    counts: dict[str, int] = {}
    for split, files in splits.items():
        if not _SPLIT_NAME.fullmatch(split):
            raise ValueError(f"split name {split!r} must be a plain folder name")
        if not files:
            raise IngestError(f"split {split!r}: no input files")
        frames = itertools.chain.from_iterable(
            iter_file(path, sid=next(file_ids), reference_energy=reference_energy) for path in files
        )
        partial = out_dir / f".{split}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            counts[split] = _write_split(frames, partial, shard_size)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _swap_in(partial, out_dir / split)
    return counts
