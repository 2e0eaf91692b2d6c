"""Fixed per-element tables used by ForceNet (Hu et al. 2021) for Z = 1..100.

Two tables, both as shipped with the OCP ForceNet reference (tag v0.0.3,
``ocpmodels/datasets/embeddings``) and transcribed here as data:

* nine continuous atomic properties (CGCNN-like, but continuous instead of one-hot),
  min-max scaled per column to [0, 1] before use;
* an atomic radius per element (pm in the table, returned in Å) used by ForceNet's
  radius-aware distance features.

Elements without data (NaN in the reference) are not silently turned into NaN
features: :func:`check_elements` raises :class:`UnsupportedElementError` naming them.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import torch
from ase.data import chemical_symbols
from torch import Tensor

#: Highest atomic number covered by the tables.
MAX_Z = 100

#: Column order of :func:`raw_features` / :func:`scaled_features`.
FEATURE_NAMES = (
    "group",  # 1..18
    "period",  # 1..7
    "electronegativity",  # as in the reference table (rescaled; H is the maximum)
    "covalent_radius_pm",
    "valence_electrons",
    "first_ionization_energy_ev",
    "electron_affinity_ev",
    "block",  # s=1, p=2, d=3, f=4
    "atomic_volume",
)

# Z, the nine FEATURE_NAMES, atomic_radius_pm. "nan" = no data in the reference.
_TABLE = """\
1,1,1,2.187771,31,1,13.59843,0.754195,1,14.1,25
2,18,1,1.0,28,2,24.58739,-19.7,1,31.8,120
3,1,2,0.04886793,128,1,5.391715,0.618049,1,13.1,145
4,2,2,0.1268473,96,2,9.322699,-2.4,1,5.0,105
5,13,2,0.2546274,84,3,8.298019,0.279723,2,4.6,85
6,14,2,0.427525,73,4,11.2603,1.262119,2,5.3,70
7,15,2,0.5774819,71,5,14.53413,-1.4,2,17.3,65
8,16,2,0.9416494,66,6,13.61805,1.461113,2,14.0,60
9,17,2,1.017681,57,7,17.42282,3.40119,2,17.1,50
10,18,2,1.0,58,8,21.56454,-3.0,2,16.8,160
11,1,3,0.09459764,166,1,5.139077,0.547926,1,23.7,180
12,2,3,0.1524211,141,2,7.646235,-3.0,1,14.0,150
13,13,3,0.2360927,121,3,5.985768,0.43283,2,10.0,125
14,14,3,0.3468158,111,4,8.151683,1.389521,2,12.1,110
15,15,3,0.4510269,107,5,10.48669,0.746607,2,17.0,100
16,16,3,0.6397251,105,6,10.36001,2.077104,2,15.5,100
17,17,3,0.8123773,102,7,12.96763,3.612725,2,18.7,100
18,18,3,1.0,106,8,15.75961,-11.5,2,24.2,71
19,1,4,0.1218383,203,1,4.340663,0.50147,1,45.3,220
20,2,4,0.1901577,176,2,6.113155,0.02455,1,29.9,180
21,3,4,0.3038674,170,3,6.56149,0.188,3,15.0,160
22,4,4,0.4055462,160,4,6.82812,0.079,3,10.6,140
23,5,4,0.4388898,153,5,6.746187,0.525,3,8.35,135
24,6,4,0.6017723,139,6,6.76651,0.666,3,7.23,140
25,7,4,0.6707264,150,7,7.434018,-3.0,3,7.39,140
26,8,4,0.748727,142,8,7.902468,0.151,3,7.1,140
27,9,4,0.8832424,138,9,7.88101,0.6622565,3,6.7,135
28,10,4,0.937704,124,10,7.639877,1.156,3,6.6,135
29,11,4,0.9175542,132,11,7.72638,1.235,3,7.1,135
30,12,4,0.8100877,122,12,9.394199,-3.0,3,9.2,135
31,13,4,0.720541,122,3,5.999302,0.43,2,11.8,130
32,14,4,0.8001471,120,4,7.899435,1.232712,2,13.6,125
33,15,4,0.8253373,119,5,9.789,0.804,2,13.1,115
34,16,4,0.9659121,120,6,9.752392,2.02067,2,16.5,115
35,17,4,1.049026,120,7,11.81381,3.363588,2,23.5,115
36,18,4,1.0,116,8,13.99961,-3.0,2,32.2,nan
37,1,5,0.1764137,220,1,4.177128,0.48592,1,55.9,235
38,2,5,0.2631786,195,2,5.694867,0.048,1,33.7,200
39,3,5,0.3923941,190,3,6.21726,0.307,3,19.8,180
40,4,5,0.4744467,175,4,6.6339,0.426,3,14.1,155
41,5,5,0.5561695,164,5,6.75885,0.917406,3,10.8,145
42,6,5,0.685295,154,6,7.09243,0.748,3,9.4,145
43,7,5,0.8753613,147,7,7.119381,0.55,3,8.5,135
44,8,5,0.9579373,146,8,7.3605,1.05,3,8.3,130
45,9,5,0.9761915,142,9,7.4589,1.137,3,8.3,135
46,10,5,1.124263,139,12,8.33686,0.562,3,8.9,140
47,11,5,0.9437955,145,11,7.576234,1.302,3,10.3,160
48,12,5,0.801562,144,12,8.993822,-3.0,3,13.1,155
49,13,5,0.7172747,142,3,5.786355,0.3,2,15.7,155
50,14,5,0.7622797,139,4,7.343917,1.112067,2,16.3,145
51,15,5,0.7762722,139,5,8.608389,1.046,2,18.4,145
52,16,5,0.8622506,138,6,9.00966,1.970876,2,20.5,140
53,17,5,0.9386429,139,7,10.45126,3.059037,2,25.7,140
54,18,5,1.0,140,8,12.12984,-0.056,2,42.9,nan
55,1,6,0.181453,244,1,3.893906,0.471626,1,70.0,260
56,2,6,0.3032951,215,2,5.211664,0.14462,1,39.0,215
57,3,6,0.3946505,207,3,5.5769,0.47,3,22.5,195
58,4,6,0.5356179,204,2,5.5386,0.65,4,21.0,185
59,5,6,0.428804,203,2,5.473,0.962,4,20.8,185
60,6,6,0.447218,201,2,5.525,1.916,4,20.6,185
61,7,6,0.4585537,199,2,5.582,-3.0,4,20.23,185
62,8,6,0.4702145,198,2,5.64371,-3.0,4,19.9,185
63,9,6,0.508508,198,2,5.670385,0.864,4,28.9,185
64,10,6,0.503386,196,2,6.149796,-3.0,4,19.9,180
65,11,6,0.5163695,194,2,5.8638,1.165,4,19.2,175
66,12,6,0.5297338,192,2,5.93905,0.352,4,19.0,175
67,13,6,0.543492,192,2,6.0215,-3.0,4,18.7,175
68,14,6,0.5576573,189,2,6.1077,-3.0,4,18.4,175
69,15,6,0.5722439,190,2,6.18431,1.029,4,18.1,175
70,16,6,0.5176678,187,2,6.25416,-0.02,4,24.8,175
71,17,6,0.6027398,187,2,5.425871,0.34,4,17.8,175
72,4,6,0.7352124,175,4,6.82507,0.014,3,13.6,155
73,5,6,0.8358832,170,5,7.54957,0.322,3,10.9,145
74,6,6,1.019283,162,6,7.86403,0.81626,3,9.53,135
75,7,6,1.174592,151,7,7.83352,0.15,3,8.85,135
76,8,6,1.239276,144,8,8.43823,1.1,3,8.43,130
77,9,6,1.475998,141,9,8.96702,1.5638,3,8.54,135
78,10,6,1.45101,136,10,8.95883,2.128,3,9.1,135
79,11,6,1.426701,136,11,9.225553,2.30863,3,10.2,135
80,12,6,1.164789,132,12,10.4375,-3.0,3,14.8,150
81,13,6,0.9245096,145,3,6.108287,0.377,2,17.2,190
82,14,6,0.9313226,146,4,7.416679,0.3567432,2,18.3,180
83,15,6,0.8136501,148,5,7.285516,0.942362,2,21.3,160
84,16,6,0.9256307,140,6,8.414,1.9,2,22.7,190
85,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan
86,18,6,1.0,150,8,10.7485,-3.0,2,50.5,nan
87,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan
88,2,7,0.3596254,221,2,5.278424,0.1,1,45.0,215
89,3,7,0.4583164,215,3,5.380226,0.35,3,22.54,195
90,4,7,0.5557019,206,2,6.3067,-3.0,4,19.8,180
91,5,7,0.6230657,200,2,5.89,-3.0,4,15.0,180
92,6,7,0.618118,196,2,6.19405,-3.0,4,12.5,175
93,7,7,0.613254,190,2,6.2655,-3.0,4,21.1,175
94,8,7,0.6084716,187,2,6.0258,-3.0,4,12.29,175
95,9,7,0.6834157,180,2,5.9738,-3.0,4,20.8,175
96,10,7,0.6900095,169,2,5.9914,-3.0,4,18.28,nan
97,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan
98,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan
99,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan
100,nan,nan,nan,nan,nan,nan,nan,nan,nan,nan
"""


class UnsupportedElementError(ValueError):
    """An atomic number for which the model has no element data."""


@cache
def _table() -> np.ndarray:
    """[101, 10] float64: row Z holds the nine features and the radius (pm); row 0 is NaN."""
    rows = np.loadtxt(io.StringIO(_TABLE), delimiter=",", dtype=np.float64)  # [100, 11]
    if rows.shape != (MAX_Z, 11) or not np.array_equal(rows[:, 0], np.arange(1, MAX_Z + 1)):
        raise RuntimeError("element table is corrupt: expected rows Z = 1..100 with 11 columns")
    out = np.full((MAX_Z + 1, 10), np.nan)
    out[1:] = rows[:, 1:]
    out.setflags(write=False)
    return out


def raw_features() -> np.ndarray:
    """Unscaled continuous features [101, 9] (row = Z, NaN where the reference has none)."""
    return _table()[:, :9].copy()


def scaled_features() -> np.ndarray:
    """Features [101, 9] min-max scaled per column to [0, 1] over the rows that have data.

    Rows without data stay NaN; :func:`feature_support` marks them.
    """
    raw = raw_features()
    known = raw[~np.isnan(raw).any(axis=1)]
    lo, hi = known.min(axis=0), known.max(axis=0)
    return (raw - lo) / (hi - lo)


def atomic_radii() -> np.ndarray:
    """Atomic radii [101] in Å (table value in pm / 100); NaN where the reference has none."""
    return _table()[:, 9] / 100.0


def feature_support() -> np.ndarray:
    """Bool [101]: True where all nine continuous features are known."""
    return ~np.isnan(_table()[:, :9]).any(axis=1)


def radius_support() -> np.ndarray:
    """Bool [101]: True where the atomic radius is known."""
    return ~np.isnan(_table()[:, 9])


def check_elements(atomic_numbers: Tensor, supported: Tensor, what: str) -> None:
    """Raise :class:`UnsupportedElementError` unless every Z has ``supported[Z]`` True.

    ``atomic_numbers`` [N] int64; ``supported`` bool [101] on the same device;
    ``what`` names the model/table in the message. One host sync per call.
    """
    z = atomic_numbers
    clamped = z.clamp(0, MAX_Z)
    ok = supported[clamped] & (clamped == z)
    if bool(ok.all()):
        return
    bad = sorted(set(z[~ok].tolist()))
    names = ", ".join(
        f"{chemical_symbols[b]} (Z={b})" if 0 < b < len(chemical_symbols) else f"Z={b}" for b in bad
    )
    raise UnsupportedElementError(
        f"{what} has no element data for {names}; supported atomic numbers: "
        f"{_ranges(torch.nonzero(supported.cpu()).flatten().tolist())}"
    )


def _ranges(values: list[int]) -> str:
    """'1-35, 37-53' style summary of a sorted list of integers."""
    parts: list[str] = []
    start: int | None = None
    prev: int | None = None
    for v in [*values, None]:
        if start is not None and (v is None or prev is None or v != prev + 1):
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ", ".join(parts)
