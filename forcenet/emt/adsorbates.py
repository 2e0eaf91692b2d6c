"""OC20-style adsorbates (H/C/N/O species) and their gas-phase reference energies under EMT.

Each adsorbate is a small molecule written in a local frame: the binding atom (index 0)
sits at the origin and the rest of the molecule points up (+z, away from the surface),
so placing it means translating the origin to a surface site at a chosen height. Bond
lengths are ordinary textbook values (Å); EMT's own molecular bond lengths differ, so the
first relaxation frames carry sizeable forces, which is what S2EF training wants.

Partition (fixed, seed-independent; mirrors OC20's out-of-domain adsorbates):
:data:`OOD_ADSORBATES` never appear in ``train``/``val_id``/``val_ood_cat``; they are used
only by ``val_ood_ads`` and ``val_ood_both``. Every element (H, C, N, O) still occurs in
the in-domain species.

Gas references follow OC20: per-element energies from gas molecules,
``H = E(H2)/2``, ``O = E(H2O) - E(H2)``, ``C = E(CO) - O``, ``N = E(N2)/2``, each molecule
relaxed under EMT. The reference of an adsorbate is the sum over its atoms.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.data import covalent_radii
from ase.optimize import BFGS

from forcenet.data import keys as K


def _umbrella(center: tuple[float, float, float], bond: float, n: int) -> list[tuple]:
    """``n`` positions at ``bond`` Å from ``center``, tetrahedral angle to -z, pointing up."""
    polar = np.deg2rad(180.0 - 109.47)  # angle from +z of the remaining tetrahedral bonds
    out = []
    for k in range(n):
        phi = 2.0 * np.pi * k / n
        out.append(
            (
                center[0] + bond * np.sin(polar) * np.cos(phi),
                center[1] + bond * np.sin(polar) * np.sin(phi),
                center[2] + bond * np.cos(polar),
            )
        )
    return out


def _tilted(center: tuple[float, float, float], bond: float, degrees: float) -> tuple:
    """A position ``bond`` Å from ``center``, tilted ``degrees`` from +z in the xz plane."""
    t = np.deg2rad(degrees)
    return (center[0] + bond * np.sin(t), center[1], center[2] + bond * np.cos(t))


_O_CH2OH = _tilted((0, 0, 0), 1.43, 30.0)
_O_CHOH = _tilted((0, 0, 0), 1.35, 30.0)
_O_COOH = _tilted((0, 0, 0), 1.35, -60.0)

#: name -> (symbols, positions [n, 3] Å); atom 0 binds to the surface.
ADSORBATES: dict[str, tuple[str, tuple[tuple[float, float, float], ...]]] = {
    "*H": ("H", ((0, 0, 0),)),
    "*O": ("O", ((0, 0, 0),)),
    "*N": ("N", ((0, 0, 0),)),
    "*C": ("C", ((0, 0, 0),)),
    "*OH": ("OH", ((0, 0, 0), (0, 0, 0.97))),
    "*OH2": ("OH2", ((0, 0, 0), (0.757, 0, 0.586), (-0.757, 0, 0.586))),
    "*CH": ("CH", ((0, 0, 0), (0, 0, 1.09))),
    "*CH2": ("CH2", ((0, 0, 0), (0.89, 0, 0.63), (-0.89, 0, 0.63))),
    "*CH3": ("CH3", ((0, 0, 0), *_umbrella((0, 0, 0), 1.09, 3))),
    "*NH": ("NH", ((0, 0, 0), (0, 0, 1.01))),
    "*NH2": ("NH2", ((0, 0, 0), (0.82, 0, 0.59), (-0.82, 0, 0.59))),
    "*NH3": ("NH3", ((0, 0, 0), *_umbrella((0, 0, 0), 1.01, 3))),
    "*CO": ("CO", ((0, 0, 0), (0, 0, 1.15))),
    "*CN": ("CN", ((0, 0, 0), (0, 0, 1.17))),
    "*NO": ("NO", ((0, 0, 0), (0, 0, 1.17))),
    "*N2": ("NN", ((0, 0, 0), (0, 0, 1.12))),
    "*COH": ("COH", ((0, 0, 0), (0, 0, 1.32), _tilted((0, 0, 1.32), 0.97, 70.0))),
    "*CHO": ("CHO", ((0, 0, 0), _tilted((0, 0, 0), 1.10, -60.0), _tilted((0, 0, 0), 1.22, 60.0))),
    "*OCH3": ("OCH3", ((0, 0, 0), (0, 0, 1.43), *_umbrella((0, 0, 1.43), 1.09, 3))),
    "*CH2OH": (
        "COHHH",
        (
            (0, 0, 0),
            _O_CH2OH,
            _tilted(_O_CH2OH, 0.97, 0.0),
            (-0.63, 0.89, 0.3),
            (-0.63, -0.89, 0.3),
        ),
    ),
    "*CHOH": ("COHH", ((0, 0, 0), _O_CHOH, _tilted(_O_CHOH, 0.97, 0.0), (-1.0, 0, 0.45))),
    "*COOH": (
        "COOH",
        ((0, 0, 0), _tilted((0, 0, 0), 1.21, 60.0), _O_COOH, _tilted(_O_COOH, 0.97, 0.0)),
    ),
}

#: Adsorbates held out of training (OC20 "out-of-domain adsorbates").
OOD_ADSORBATES: tuple[str, ...] = ("*C", "*NH2", "*COH", "*CH2OH", "*NO")
#: Adsorbates seen in training.
ID_ADSORBATES: tuple[str, ...] = tuple(a for a in ADSORBATES if a not in OOD_ADSORBATES)


def adsorbate_atoms(name: str) -> Atoms:
    """The adsorbate ``name`` as ASE atoms in its local frame (binding atom 0 at the origin)."""
    if name not in ADSORBATES:
        raise KeyError(f"unknown adsorbate {name!r}; known: {', '.join(ADSORBATES)}")
    symbols, positions = ADSORBATES[name]
    return Atoms(symbols, positions=np.asarray(positions, dtype=np.float64))


def _relaxed_gas_energy(name: str) -> float:
    """EMT energy (eV) of gas molecule ``name`` relaxed in a 12 Å-padded box."""
    mol = molecule(name)
    mol.center(vacuum=6.0)
    mol.calc = EMT()
    BFGS(mol, logfile=None).run(fmax=0.005, steps=200)
    return float(mol.get_potential_energy())


@cache
def gas_references() -> dict[str, float]:
    """Per-element gas-phase reference energies (eV) for H, C, N, O under EMT (OC20 scheme)."""
    h2, h2o = _relaxed_gas_energy("H2"), _relaxed_gas_energy("H2O")
    co, n2 = _relaxed_gas_energy("CO"), _relaxed_gas_energy("N2")
    ref_o = h2o - h2
    return {"H": 0.5 * h2, "O": ref_o, "C": co - ref_o, "N": 0.5 * n2}


def adsorbate_reference(symbols: list[str]) -> float:
    """Gas-phase reference energy (eV) of a set of adsorbate atoms: the sum of element refs."""
    refs = gas_references()
    return float(sum(refs[s] for s in symbols))


#: Largest random tilt (degrees) of an adsorbate's axis away from the surface normal.
MAX_TILT_DEG = 15.0
#: Fraction of the covalent bond length below which non-binding atoms count as clashing.
_CLASH = 0.9


def _min_image(vectors: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Shortest periodic images of ``vectors`` [..., 3] in an x/y-periodic slab cell."""
    frac = vectors @ np.linalg.inv(cell)  # [..., 3]
    frac[..., :2] -= np.round(frac[..., :2])
    return frac @ cell


def _site_height(slab: Atoms, site_xy: np.ndarray, z_top: float, binding: int) -> float:
    """Lowest height (Å above ``z_top``) at which the binding atom is no closer to any slab
    atom than the sum of covalent radii (so on top, bridge or hollow it touches its site)."""
    probe = np.array([site_xy[0], site_xy[1], z_top])
    delta = _min_image(slab.positions - probe, np.array(slab.cell))  # [n_slab, 3]
    rho2 = (delta[:, :2] ** 2).sum(axis=1)
    bond = covalent_radii[binding] + covalent_radii[slab.numbers]  # [n_slab] Å
    reach = rho2 < bond**2
    need = delta[reach, 2] + np.sqrt(bond[reach] ** 2 - rho2[reach])
    return float(max(need.max(initial=0.0), 0.5 * bond.min()))


def place_adsorbate(slab: Atoms, name: str, site: str, rng: np.random.Generator) -> Atoms:
    """Slab + adsorbate ``name`` bound through its atom 0 at a random ``site`` of that type.

    The site (an ASE site name such as ``ontop``, ``bridge``, ``fcc``, ``hollow``) is taken
    in a random surface unit cell; the molecule gets a random azimuth and a tilt of at most
    :data:`MAX_TILT_DEG`; the binding atom sits where it touches its site (sum of covalent
    radii), raised further if another adsorbate atom would clash with the slab. Adsorbate
    atoms get tag 2; the slab's tags and ``FixAtoms`` constraint are kept.
    """
    info = slab.info["adsorbate_info"]
    if site not in info["sites"]:
        raise KeyError(f"site {site!r} not on this facet; known: {', '.join(info['sites'])}")
    offset = rng.integers(0, 3, size=2)
    site_xy = (np.asarray(info["sites"][site], dtype=float) + offset) @ info["cell"]  # [2] Å
    ads = adsorbate_atoms(name)
    tilt_axis = rng.uniform(0.0, 2.0 * np.pi)
    ads.rotate(rng.uniform(0.0, MAX_TILT_DEG), (np.cos(tilt_axis), np.sin(tilt_axis), 0.0))
    ads.rotate(rng.uniform(0.0, 360.0), "z")
    z_top = float(slab.positions[:, 2].max())
    height = _site_height(slab, site_xy, z_top, int(ads.numbers[0]))
    cell = np.array(slab.cell)
    bond = covalent_radii[ads.numbers][:, None] + covalent_radii[slab.numbers][None, :]
    for _ in range(50):  # raise in 0.1 Å steps until nothing clashes (rarely needed)
        pos = ads.positions + np.array([site_xy[0], site_xy[1], z_top + height])
        delta = _min_image(slab.positions[None, :, :] - pos[:, None, :], cell)  # [n_ads, n_slab, 3]
        if np.all(np.linalg.norm(delta, axis=-1) >= _CLASH * bond):
            break
        height += 0.1
    ads.positions = pos
    ads.set_tags(np.full(len(ads), K.TAG_ADSORBATE))
    system = slab.copy()
    system.extend(ads)
    system.wrap()
    return system


#: Rejection thresholds used by :class:`StructureCheck`.
DESORB_HEIGHT = 3.0  # Å
DISSOCIATION_FACTOR = 1.6
SLAB_DISPLACEMENT = 1.0  # Å


class StructureCheck:
    """Structural rejection rules for frames of one adsorbate+slab system.

    Built from the starting placement; calling it on later positions [N, 3] returns
    ``"slab_displaced"`` (a slab atom moved more than :data:`SLAB_DISPLACEMENT` Å),
    ``"desorbed"`` (the lowest adsorbate atom is more than :data:`DESORB_HEIGHT` Å above
    the starting top slab layer, or some adsorbate atom is above the adsorbate zone
    ``zone`` Å, which would eat into the vacuum), ``"dissociated"`` (a bond of the placed
    adsorbate, a pair closer than 1.25x its covalent length, stretched beyond
    :data:`DISSOCIATION_FACTOR` times that length) or None for a sound frame.
    """

    def __init__(self, atoms: Atoms, zone: float) -> None:
        tags = atoms.get_tags()
        self.slab = tags != K.TAG_ADSORBATE
        self.ads = np.flatnonzero(~self.slab)
        self.slab_pos = atoms.positions[self.slab].copy()
        self.z_surface = float(self.slab_pos[:, 2].max())
        self.cell = np.array(atoms.cell)
        self.zone = zone
        radii = covalent_radii[atoms.numbers[self.ads]]
        i, j = np.triu_indices(len(self.ads), k=1)
        covalent = radii[i] + radii[j]
        bonded = self._distances(atoms.positions, i, j) < 1.25 * covalent
        self.bonds = (i[bonded], j[bonded], covalent[bonded])

    def _distances(self, pos: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        delta = pos[self.ads[j]] - pos[self.ads[i]]  # [n_pairs, 3]
        frac = delta @ np.linalg.inv(self.cell)
        frac[:, :2] -= np.round(frac[:, :2])  # minimum image along the periodic surface
        return np.linalg.norm(frac @ self.cell, axis=1)

    def __call__(self, pos: np.ndarray) -> str | None:
        if np.linalg.norm(pos[self.slab] - self.slab_pos, axis=1).max() > SLAB_DISPLACEMENT:
            return "slab_displaced"
        height = pos[self.ads, 2] - self.z_surface
        if height.min() > DESORB_HEIGHT or height.max() > self.zone:
            return "desorbed"
        i, j, covalent = self.bonds
        if np.any(self._distances(pos, i, j) > DISSOCIATION_FACTOR * covalent):
            return "dissociated"
        return None
