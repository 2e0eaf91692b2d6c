"""Small fcc metal and binary-alloy slabs for the EMT dataset, with OC20 tags and constraints.

Catalysts are compositions of the seven fcc metals ASE's EMT supports (Al, Ni, Cu, Pd, Ag,
Pt, Au): the pure metals and, for each pair A-B (A before B in :data:`METALS`), the
ratios A3B, AB and AB3. An alloy slab is a random substitution of the host fcc lattice with
the exact number of B atoms, drawn from a seed per (catalyst, facet); its lattice constant
follows Vegard's law between the EMT equilibrium constants of the pure metals (found by
minimising the EMT bulk energy, so the pure slabs carry no strain).

Facets and sizes (``(nx, ny, layers)``, slab atoms, atoms tagged 1 = free):
(111) 3x3x3, 27, top 2 layers; (100) 3x3x3, 27, top 2 layers; (110) 2x3x4, 24, top 2
layers. The bottom layers are tag 0 (sub-surface) and held by ``FixAtoms`` as in OC20.
The slab's bottom layer sits at z = 0; the cell height is ``top layer + ADSORBATE_ZONE +
VACUUM``, so at least :data:`VACUUM` Å of empty space separates anything within
:data:`ADSORBATE_ZONE` Å of the surface from the next periodic image. pbc is True on x, y, z.

Partition (fixed, seed-independent; mirrors OC20's out-of-domain catalysts):
:data:`OOD_CATALYSTS` (every ratio of the Ni-Pd, Cu-Ag, Pt-Au and Al-Cu systems, and pure
Ag) never appear in ``train``/``val_id``/``val_ood_ads``; they are used only by
``val_ood_cat`` and ``val_ood_both``. Every metal still appears in the in-domain catalysts.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc110, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS
from scipy.optimize import minimize_scalar

from forcenet.data import keys as K

#: eV/Å, convergence of the clean-slab relaxation (reference energy), and its step cap.
SLAB_FMAX = 0.05
SLAB_STEPS = 200

METALS: tuple[str, ...] = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
#: Å of empty space above the adsorbate zone, up to the periodic image of the slab bottom.
VACUUM = 10.0
#: Å above the top slab layer that adsorbates may occupy (desorption is checked against it).
ADSORBATE_ZONE = 7.0

_BUILDERS = {"111": fcc111, "100": fcc100, "110": fcc110}
#: facet -> (size (nx, ny, layers), number of free top layers tagged 1)
FACETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "111": ((3, 3, 3), 2),
    "100": ((3, 3, 3), 2),
    "110": ((2, 3, 4), 2),
}
#: facet -> ASE adsorption-site names (top, bridge and hollow variants of that facet).
SITES: dict[str, tuple[str, ...]] = {
    "111": ("ontop", "bridge", "fcc", "hcp"),
    "100": ("ontop", "bridge", "hollow"),
    "110": ("ontop", "longbridge", "shortbridge", "hollow"),
}


def _binary_catalysts() -> list[tuple[str, dict[str, float]]]:
    out = []
    for a, b in itertools.combinations(METALS, 2):
        out.append((f"{a}3{b}", {a: 0.75, b: 0.25}))
        out.append((f"{a}{b}", {a: 0.5, b: 0.5}))
        out.append((f"{a}{b}3", {a: 0.25, b: 0.75}))
    return out


#: catalyst name -> atomic fractions, in a fixed order (unaries first).
CATALYSTS: dict[str, dict[str, float]] = {
    **{m: {m: 1.0} for m in METALS},
    **dict(_binary_catalysts()),
}
_OOD_PAIRS = (("Ni", "Pd"), ("Cu", "Ag"), ("Pt", "Au"), ("Al", "Cu"))
#: Catalyst compositions held out of training (OC20 "out-of-domain catalysts").
OOD_CATALYSTS: tuple[str, ...] = ("Ag",) + tuple(
    name for name, frac in CATALYSTS.items() if len(frac) == 2 and tuple(frac) in _OOD_PAIRS
)
#: Catalyst compositions seen in training.
ID_CATALYSTS: tuple[str, ...] = tuple(c for c in CATALYSTS if c not in OOD_CATALYSTS)


@cache
def emt_lattice_constant(symbol: str) -> float:
    """fcc lattice constant (Å) minimising the EMT bulk energy of ``symbol``."""

    def energy(a: float) -> float:
        cell = bulk(symbol, "fcc", a=a)
        cell.calc = EMT()
        return float(cell.get_potential_energy())

    res = minimize_scalar(energy, bounds=(3.0, 4.8), method="bounded", options={"xatol": 1e-6})
    return float(res.x)


def lattice_constant(catalyst: str) -> float:
    """Vegard's-law lattice constant (Å) of ``catalyst`` from the EMT constants of its metals."""
    return float(sum(x * emt_lattice_constant(m) for m, x in CATALYSTS[catalyst].items()))


def _retag(slab: Atoms, n_free_layers: int) -> None:
    """OC20 tags (1 = top ``n_free_layers`` layers, 0 = below) and FixAtoms on tag 0."""
    z = slab.positions[:, 2]
    layers = np.unique(np.round(z, 3))  # ascending layer heights, Å
    cut = layers[-n_free_layers]
    tags = np.where(z >= cut - 1e-3, K.TAG_SURFACE, K.TAG_SUBSURFACE)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == K.TAG_SUBSURFACE))


def build_slab(catalyst: str, facet: str, rng: np.random.Generator) -> Atoms:
    """Unrelaxed slab of ``catalyst`` with Miller index ``facet`` (see module doc).

    ``rng`` draws which sites an alloy's minority metal occupies. The slab keeps ASE's
    ``adsorbate_info`` (site names and the surface unit cell) for adsorbate placement.
    """
    if catalyst not in CATALYSTS:
        raise KeyError(f"unknown catalyst {catalyst!r}")
    if facet not in FACETS:
        raise KeyError(f"unknown facet {facet!r}; known: {', '.join(FACETS)}")
    size, n_free = FACETS[facet]
    fractions = CATALYSTS[catalyst]
    host = next(iter(fractions))
    slab = _BUILDERS[facet](host, size=size, a=lattice_constant(catalyst), vacuum=None)
    slab.positions[:, 2] -= slab.positions[:, 2].min()
    if len(fractions) == 2:
        minority, x = list(fractions.items())[1]
        n_sub = int(round(x * len(slab)))
        symbols = np.array(slab.get_chemical_symbols(), dtype=object)
        symbols[rng.choice(len(slab), size=n_sub, replace=False)] = minority
        slab.set_chemical_symbols(symbols.tolist())
    cell = np.array(slab.cell)
    cell[2] = [0.0, 0.0, slab.positions[:, 2].max() + ADSORBATE_ZONE + VACUUM]
    slab.set_cell(cell)
    slab.pbc = (True, True, True)
    _retag(slab, n_free)
    return slab


def catalyst_slab(seed: int, catalyst: str, facet: str) -> Atoms:
    """The unrelaxed slab of ``catalyst`` and ``facet``; an alloy's decoration depends on
    ``seed`` (and on nothing else), so every process builds the same slab."""
    key = [seed, 1000 + list(CATALYSTS).index(catalyst), list(FACETS).index(facet)]
    return build_slab(catalyst, facet, np.random.default_rng(key))


def relax_clean_slab(seed: int, catalyst: str, facet: str) -> tuple[np.ndarray, float]:
    """Relaxed positions [n, 3] (Å) and EMT energy (eV) of the clean slab."""
    slab = catalyst_slab(seed, catalyst, facet)
    slab.calc = EMT()
    BFGS(slab, logfile=None).run(fmax=SLAB_FMAX, steps=SLAB_STEPS)
    return slab.positions.copy(), float(slab.get_potential_energy())
