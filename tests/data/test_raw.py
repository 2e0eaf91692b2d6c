"""The raw OC20 S2EF shard format: exact round trips, ASE compatibility, bad input."""

from __future__ import annotations

import dataclasses
import lzma
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from forcenet.data.frame import Frame
from forcenet.data.raw import (
    RawFormatError,
    count_frames,
    iter_shard,
    iter_split,
    list_shards,
    write_shard,
)

CELL = np.array([[8.07, 0.0, 0.0], [3.1, 6.93, 0.0], [0.0, 0.0, 39.4]])  # skewed, Å


def make_frame(rng: np.random.Generator, i: int, n: int = 7) -> Frame:
    return Frame(
        atomic_numbers=rng.choice([1, 6, 8, 13, 29, 34, 78], n),
        pos=rng.uniform(0.0, 6.0, (n, 3)),
        cell=CELL,
        pbc=np.array([True, True, True]),
        tags=rng.integers(0, 3, n),
        fixed=rng.random(n) < 0.5,
        forces=rng.normal(0.0, 0.2, (n, 3)),
        total_energy=-135.66393572 + 0.01 * i,
        reference_energy=-120.123456789,
        sid=1331004 + i // 3,
        fid=i % 3,
        free_energy=-135.7 + 0.01 * i,
    )


@pytest.fixture
def frames() -> list[Frame]:
    rng = np.random.default_rng(1)
    return [make_frame(rng, i) for i in range(6)]


def write_text(directory: Path, k: int, xyz: str, rows: list[str]) -> Path:
    """A hand-written shard pair (for inputs our writer would refuse to produce)."""
    path = directory / f"{k}.extxyz.xz"
    path.write_bytes(lzma.compress(xyz.encode()))
    (directory / f"{k}.txt.xz").write_bytes(lzma.compress("".join(r + "\n" for r in rows).encode()))
    return path


def frame_text(species: str = "Cu", pos: str = "0 0 0", forces: str = "0.1 0 0") -> str:
    head = (
        'Lattice="4 0 0 0 4 0 0 0 20" Properties=species:S:1:pos:R:3:move_mask:L:1:'
        'tags:I:1:forces:R:3 energy=-3.5 free_energy=-3.5 pbc="T T T"'
    )
    return f"2\n{head}\n{species} {pos} F 0 {forces}\nO 1 1 1 T 2 0 0 0.2\n"


def test_round_trip_is_exact(tmp_path: Path, frames: list[Frame]) -> None:
    assert write_shard(tmp_path, 0, frames) == len(frames)
    back = list(iter_shard(tmp_path / "0.extxyz.xz"))
    assert len(back) == len(frames)
    for a, b in zip(frames, back, strict=True):
        np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
        np.testing.assert_array_equal(a.tags, b.tags)
        np.testing.assert_array_equal(a.fixed, b.fixed)
        np.testing.assert_array_equal(a.pbc, b.pbc)
        np.testing.assert_allclose(b.pos, a.pos, rtol=0, atol=1e-9)
        np.testing.assert_allclose(b.forces, a.forces, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(b.cell, a.cell)
        assert (b.total_energy, b.free_energy) == (a.total_energy, a.free_energy)
        assert (b.sid, b.fid, b.reference_energy) == (a.sid, a.fid, a.reference_energy)
        assert b.energy == pytest.approx(a.total_energy - a.reference_energy, abs=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.extxyz.xz", "0.txt.xz"]


def test_ase_reads_our_shards_like_oc20(tmp_path: Path, frames: list[Frame]) -> None:
    write_shard(tmp_path, 3, frames)
    plain = tmp_path / "3.extxyz"
    plain.write_bytes(lzma.decompress((tmp_path / "3.extxyz.xz").read_bytes()))
    images = ase.io.read(plain, index=":")
    assert len(images) == len(frames)
    for atoms, frame in zip(images, frames, strict=True):
        assert atoms.get_potential_energy() == pytest.approx(frame.total_energy, abs=1e-10)
        got_forces = atoms.get_forces(apply_constraint=False)
        np.testing.assert_allclose(got_forces, frame.forces, atol=1e-9)
        np.testing.assert_array_equal(atoms.get_tags(), frame.tags)
        np.testing.assert_allclose(atoms.cell.array, frame.cell, atol=1e-12)
        fixed = np.zeros(frame.natoms, bool)
        for c in atoms.constraints:
            assert isinstance(c, FixAtoms)
            fixed[c.index] = True
        np.testing.assert_array_equal(fixed, frame.fixed)
    rows = lzma.decompress((tmp_path / "3.txt.xz").read_bytes()).decode().splitlines()
    assert rows[0] == f"random{frames[0].sid},frame{frames[0].fid},{frames[0].reference_energy!r}"


def test_reads_extxyz_written_by_ase(tmp_path: Path) -> None:
    """An independent writer (ASE): other column order, molecule without Lattice/tags."""
    rng = np.random.default_rng(2)
    slab = Atoms("Cu3O", positions=rng.uniform(0, 3, (4, 3)), cell=CELL, pbc=True)
    slab.set_tags([0, 0, 1, 2])
    slab.set_constraint(FixAtoms(indices=[0, 1]))
    slab_f = rng.normal(size=(4, 3))
    slab.calc = SinglePointCalculator(slab, energy=-12.5, forces=slab_f)
    mol = Atoms("H2O", positions=rng.uniform(0, 2, (3, 3)))  # pbc False, zero cell, no tags
    mol_f = rng.normal(size=(3, 3))
    mol.calc = SinglePointCalculator(mol, energy=-14.25, forces=mol_f)
    plain = tmp_path / "plain.extxyz"
    ase.io.write(plain, [slab, mol], format="extxyz")
    (tmp_path / "0.extxyz.xz").write_bytes(lzma.compress(plain.read_bytes()))
    rows = "random7,frame0,-1.5\nrandom8,frame0,0.0\n"
    (tmp_path / "0.txt.xz").write_bytes(lzma.compress(rows.encode()))
    a, b = iter_shard(tmp_path / "0.extxyz.xz")
    np.testing.assert_array_equal(a.atomic_numbers, [29, 29, 29, 8])
    np.testing.assert_array_equal(a.fixed, [True, True, False, False])
    np.testing.assert_array_equal(a.tags, [0, 0, 1, 2])
    np.testing.assert_allclose(a.forces, slab_f, atol=1e-7)
    assert (a.energy, a.sid) == (-11.0, 7)
    np.testing.assert_array_equal(b.pbc, [False, False, False])
    np.testing.assert_array_equal(b.cell, np.zeros((3, 3)))
    np.testing.assert_array_equal(b.tags, [1, 1, 1])  # tags absent -> 1
    np.testing.assert_array_equal(b.fixed, [False] * 3)  # no move_mask -> all free
    np.testing.assert_allclose(b.pos, mol.positions, atol=1e-7)
    assert b.total_energy == -14.25 and b.free_energy is None


def test_column_order_is_read_from_properties(tmp_path: Path) -> None:
    xyz = (
        "2\nProperties=forces:R:3:tags:I:1:species:S:1:pos:R:3 Lattice='5 0 0 0 5 0 0 0 5' "
        "energy=-1.0 pbc='T T F'\n"
        "0.1 0.2 0.3 2 Pt 1 2 3\n-0.1 -0.2 -0.3 0 C 4 4 4\n"
    )
    (frame,) = iter_shard(write_text(tmp_path, 0, xyz, ["random1,frame2,0.5"]))
    np.testing.assert_array_equal(frame.atomic_numbers, [78, 6])
    np.testing.assert_array_equal(frame.tags, [2, 0])
    np.testing.assert_array_equal(frame.pos, [[1, 2, 3], [4, 4, 4]])
    np.testing.assert_array_equal(frame.forces, [[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]])
    np.testing.assert_array_equal(frame.pbc, [True, True, False])
    assert (frame.sid, frame.fid, frame.energy) == (1, 2, -1.5)


def test_list_shards_sorts_numerically_and_counts(tmp_path: Path, frames: list[Frame]) -> None:
    for k, chunk in ((10, frames[:1]), (2, frames[1:3]), (0, frames[3:])):
        write_shard(tmp_path, k, chunk)
    assert [p.name for p in list_shards(tmp_path)] == [f"{k}.extxyz.xz" for k in (0, 2, 10)]
    assert count_frames(tmp_path) == len(frames)
    order = [f.total_energy for f in iter_split(tmp_path)]
    expected = [f.total_energy for f in frames[3:] + frames[1:3] + frames[:1]]
    assert order == expected
    (tmp_path / "2.txt.xz").unlink()
    with pytest.raises(RawFormatError, match=r"2\.extxyz\.xz.*sidecar 2\.txt\.xz is missing"):
        list_shards(tmp_path)


def test_failed_write_leaves_nothing(tmp_path: Path, frames: list[Frame]) -> None:
    def broken():
        yield frames[0]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path, 0, broken())
    bad = dataclasses.replace(frames[1], pos=np.full((7, 3), np.nan))
    with pytest.raises(ValueError, match=r"0\.extxyz\.xz: frame 1.*pos contains NaN"):
        write_shard(tmp_path, 0, [frames[0], bad])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: no frames to write"):
        write_shard(tmp_path, 0, [])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad input


def test_truncated_xz(tmp_path: Path, frames: list[Frame]) -> None:
    path = tmp_path / "0.extxyz.xz"
    write_shard(tmp_path, 0, frames)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: frame \d+ .*corrupt or truncated"):
        list(iter_shard(path))


def test_truncated_xz_names_last_good_frame_and_line(tmp_path: Path) -> None:
    """A cut shard yields every intact frame, then names the failing frame, the last good
    one and the line (frames already decoded into the read-ahead buffer count)."""
    rng = np.random.default_rng(2)
    frames = [make_frame(rng, i) for i in range(400)]
    path = tmp_path / "0.extxyz.xz"
    write_shard(tmp_path, 0, frames)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    read: list[Frame] = []
    with pytest.raises(RawFormatError) as err:
        read.extend(iter_shard(path))
    good = len(read)
    assert 100 < good < 300  # the frames before the cut came through
    lines_per_frame = 7 + 2
    message = str(err.value)
    assert f"frame {good} (the last good frame is {good - 1})" in message
    line = int(message.split(", line ")[1].split(":")[0])
    assert good * lines_per_frame < line <= (good + 1) * lines_per_frame
    assert "corrupt or truncated xz data" in message


def test_damage_inside_an_xz_shard_names_the_last_good_frame(tmp_path: Path) -> None:
    """Bytes overwritten mid-file: every frame before the damage comes through intact,
    then the error names the last good frame, as for a cut file."""
    rng = np.random.default_rng(3)
    frames = [make_frame(rng, i) for i in range(400)]
    path = tmp_path / "0.extxyz.xz"
    write_shard(tmp_path, 0, frames)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    read: list[Frame] = []
    with pytest.raises(RawFormatError) as err:
        read.extend(iter_shard(path))
    good = len(read)
    assert 100 < good < 300  # the frames before the damage came through
    for got, want in zip(read, frames, strict=False):
        assert (got.sid, got.fid) == (want.sid, want.fid)
        np.testing.assert_allclose(got.pos, want.pos, atol=1e-9)
    message = str(err.value)
    assert f"frame {good} (the last good frame is {good - 1})" in message
    assert "corrupt or truncated xz data" in message


def test_sidecar_with_fewer_rows(tmp_path: Path) -> None:
    path = write_text(tmp_path, 0, frame_text() * 3, ["random1,frame0,0.0", "random1,frame1,0.0"])
    with pytest.raises(RawFormatError, match=r"0\.txt\.xz: has 2 rows.*no row for frame 2"):
        list(iter_shard(path))


def test_sidecar_with_more_rows(tmp_path: Path) -> None:
    path = write_text(tmp_path, 0, frame_text(), ["random1,frame0,0.0", "random1,frame1,0.0"])
    with pytest.raises(
        RawFormatError, match=r"0\.txt\.xz: has more rows than the 1 frames.*line 2"
    ):
        list(iter_shard(path))


def test_malformed_sidecar_row(tmp_path: Path) -> None:
    path = write_text(tmp_path, 0, frame_text() * 2, ["random1,frame0,0.0", "1,0,zero"])
    with pytest.raises(RawFormatError, match=r"0\.txt\.xz, line 2 \(frame 1\)"):
        list(iter_shard(path))


def test_nan_coordinates(tmp_path: Path) -> None:
    xyz = frame_text() + frame_text(pos="0 nan 0")
    path = write_text(tmp_path, 0, xyz, ["random1,frame0,0.0", "random1,frame1,0.0"])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: frame 1 \(line 5\).*pos .*NaN"):
        list(iter_shard(path))


def test_inf_forces(tmp_path: Path) -> None:
    path = write_text(tmp_path, 0, frame_text(forces="0 inf 0"), ["random1,frame0,0.0"])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: frame 0 \(line 1\).*forces .*inf"):
        list(iter_shard(path))


def test_unknown_element(tmp_path: Path) -> None:
    xyz = frame_text() + frame_text(species="Xx")
    path = write_text(tmp_path, 0, xyz, ["random1,frame0,0.0", "random1,frame1,0.0"])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: frame 1 .*unknown element.*'Xx'"):
        list(iter_shard(path))


def test_empty_file(tmp_path: Path) -> None:
    path = write_text(tmp_path, 0, "", [])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: empty shard"):
        list(iter_shard(path))


def test_atomic_number_above_100_names_file_and_frame(tmp_path: Path) -> None:
    """Z > 100 has no row in the models' element tables: refused when reading, not in a model."""
    path = write_text(tmp_path, 0, frame_text() + frame_text("Md"), ["random1,frame0,0.0"] * 2)
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: frame 1 .*outside 1\.\.100.*\[101\]"):
        list(iter_shard(path))
    rng = np.random.default_rng(0)
    heavy = dataclasses.replace(make_frame(rng, 0), atomic_numbers=np.array([29] * 6 + [104]))
    with pytest.raises(ValueError, match=r"frame 0: atomic number outside 1\.\.100"):
        write_shard(tmp_path / "w", 0, [heavy])


def test_atoms_at_the_same_position_name_frame_and_atoms(tmp_path: Path) -> None:
    """Two atoms at one position (here through the periodic image: x = 0 and x = 4) are
    refused naming the frame and both atoms, not dropped as a zero-length edge later."""
    path = write_text(
        tmp_path, 0, frame_text() + frame_text(pos="5 1 1"), ["random1,frame0,0.0"] * 2
    )
    with pytest.raises(
        RawFormatError, match=r"0\.extxyz\.xz: frame 1 .*atoms 0 and 1 are 0 Å apart.*0\.1 Å"
    ):
        list(iter_shard(path))
    close = frame_text(pos="1.05 1 1")  # 0.05 Å from atom 1: under the minimum distance
    path = write_text(tmp_path, 1, close, ["random1,frame0,0.0"])
    with pytest.raises(RawFormatError, match=r"frame 0 .*atoms 0 and 1 are 0\.05 Å apart"):
        list(iter_shard(path))


def test_zero_volume_cell(tmp_path: Path) -> None:
    xyz = frame_text().replace('Lattice="4 0 0 0 4 0 0 0 20"', 'Lattice="4 0 0 8 0 0 0 0 20"')
    path = write_text(tmp_path, 0, xyz, ["random1,frame0,0.0"])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: frame 0 .*zero volume"):
        list(iter_shard(path))


@pytest.mark.parametrize(
    ("xyz", "message"),
    [
        (frame_text(pos="0 0"), r"frame 1 \(line 5\), line 7: expected 9 columns, got 8"),
        (frame_text(pos="0 x 0"), r"frame 1 \(line 5\), line 7: column 'pos' is not numeric"),
        ("two\n", r"frame 1 \(line 5\): expected an atom count"),
        (frame_text().replace(" energy=-3.5 ", " ", 1), r"frame 1 \(line 5\): no energy="),
        (frame_text()[:-20], r"frame 1 \(line 5\): file ends inside the frame"),
    ],
)
def test_malformed_lines(tmp_path: Path, xyz: str, message: str) -> None:
    path = write_text(tmp_path, 0, frame_text() + xyz, ["random1,frame0,0.0", "random1,frame1,0.0"])
    with pytest.raises(RawFormatError, match=r"0\.extxyz\.xz: " + message):
        list(iter_shard(path))


def test_a_fifo_shard_or_sidecar_is_refused_not_read(tmp_path: Path, frames: list[Frame]) -> None:
    """A FIFO in a split folder would block the reader forever; it is refused by name."""
    from tiny import fifo_fed_once

    write_shard(tmp_path / "a", 0, frames)
    (tmp_path / "a" / "0.extxyz.xz").unlink()
    with fifo_fed_once(tmp_path / "a" / "0.extxyz.xz") as fifo:
        with pytest.raises(RawFormatError, match=rf"{fifo}: not a regular file"):
            list(iter_split(tmp_path / "a"))
        with pytest.raises(RawFormatError, match=rf"{fifo}: not a regular file"):
            list(iter_shard(fifo))
    write_shard(tmp_path / "b", 0, frames)
    (tmp_path / "b" / "0.txt.xz").unlink()
    with fifo_fed_once(tmp_path / "b" / "0.txt.xz") as fifo:
        with pytest.raises(RawFormatError, match=rf"{fifo}: not a regular file"):
            count_frames(tmp_path / "b")
