"""Shared neural-network layers: activations, scalar basis expansions, real spherical
harmonics (in torch, differentiable, on the input's device), MLP builders, and the
energy-and-gradient-forces forward shared by the energy-centric models.

Every basis module exposes ``out_features`` so that models can size the layer that
follows without running it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forcenet.data import keys as K
from forcenet.geometry import gradient_forces

ActivationName = Literal[
    "swish",
    "ssp",
    "relu",
    "sp",
    "elu",
    "tanh",
    "leaky_ssp",
    "leaky_relu",
    "leaky_sp",
    "leaky_elu",
    "leaky_tanh",
]
ScalarBasisName = Literal["powersine", "powercosine", "fouriersine", "gauss", "linact", "raw"]
SphParity = Literal["all", "sine", "cosine"]

#: Negative-side slope added by the ``leaky_*`` activations (as in the OCP ForceNet code).
LEAKY_SLOPE = 0.05


def check_choice(name: str, value: object, options: object) -> None:
    """Raise ValueError unless ``value`` is one of the ``Literal`` type ``options``."""
    allowed = get_args(options)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


# ----------------------------------------------------------------------------- activations


class ShiftedSoftplus(nn.Module):
    """softplus(x) - ln 2 (SchNet's ssp): zero at x = 0."""

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x) - math.log(2.0)


class LeakyNegative(nn.Module):
    """``base(x) - slope * relu(-x)``: gives a saturating activation a slope for x < 0."""

    def __init__(self, base: nn.Module, slope: float = LEAKY_SLOPE) -> None:
        super().__init__()
        self.base = base
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) - self.slope * F.relu(-x)


class LeakyTanh(nn.Module):
    """tanh(x) + slope * x: never fully saturates."""

    def __init__(self, slope: float = LEAKY_SLOPE) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x) + self.slope * x


def activation(name: ActivationName) -> nn.Module:
    """A fresh activation module by name (``swish`` = x * sigmoid(x), ``sp`` = softplus,
    ``ssp`` = softplus - ln 2; ``leaky_*`` subtract 0.05 relu(-x), ``leaky_tanh`` adds 0.05 x)."""
    check_choice("activation", name, ActivationName)
    plain: dict[str, type[nn.Module]] = {
        "swish": nn.SiLU,
        "ssp": ShiftedSoftplus,
        "relu": nn.ReLU,
        "sp": nn.Softplus,
        "elu": nn.ELU,
        "tanh": nn.Tanh,
    }
    if name == "leaky_tanh":
        return LeakyTanh()
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)  # relu(x) - 0.05 relu(-x)
    if name.startswith("leaky_"):
        return LeakyNegative(plain[name.removeprefix("leaky_")]())
    return plain[name]()


# ----------------------------------------------------------------------------- scalar bases


class SinusoidalBasis(nn.Module):
    """sin (or cos) of each input times ``num_freqs`` fixed frequencies.

    ``powersine``: frequencies 1.1^0 ... 1.1^(F-1), sin; ``powercosine``: same, cos;
    ``fouriersine``: frequencies 0, 1, ..., F-1, sin. Inputs [M, k] (dimensionless,
    typically in [0, 1]) -> [M, F*k], frequency-major (all k inputs at frequency 0, then
    at frequency 1, ...), as in the OCP ForceNet code.
    """

    freqs: Tensor  # [F] buffer

    def __init__(
        self,
        in_features: int,
        num_freqs: int,
        kind: Literal["powersine", "powercosine", "fouriersine"] = "powersine",
    ) -> None:
        super().__init__()
        steps = torch.arange(num_freqs, dtype=torch.float64)
        freqs = steps if kind == "fouriersine" else 1.1**steps
        self.register_buffer("freqs", freqs.to(torch.get_default_dtype()), persistent=False)
        self._wave = torch.cos if kind == "powercosine" else torch.sin
        self.out_features = in_features * num_freqs

    def forward(self, x: Tensor) -> Tensor:
        # [M, 1, k] * [F, 1] -> [M, F, k] -> [M, F*k]
        return self._wave((x.unsqueeze(-2) * self.freqs[:, None]).flatten(-2))


class GaussianBasis(nn.Module):
    """``num_freqs`` Gaussians with centres evenly spaced on [0, 1] and width = spacing.

    exp(-(x - mu)^2 / (2 spacing^2)); inputs [M, k] -> [M, F*k], centre-major.
    """

    centres: Tensor  # [F] buffer

    def __init__(self, in_features: int, num_freqs: int) -> None:
        super().__init__()
        if num_freqs < 2:
            raise ValueError(f"gauss basis needs num_freqs >= 2, got {num_freqs}")
        self.register_buffer("centres", torch.linspace(0.0, 1.0, num_freqs), persistent=False)
        self.coeff = -0.5 * (num_freqs - 1) ** 2  # -1 / (2 spacing^2)
        self.out_features = in_features * num_freqs

    def forward(self, x: Tensor) -> Tensor:
        diff = x.unsqueeze(-2) - self.centres[:, None]  # [M, F, k]
        return torch.exp(self.coeff * diff.square()).flatten(-2)


class LinearActivationBasis(nn.Sequential):
    """Learnable expansion: act(Linear(k -> k*F)) (``linact`` in ForceNet)."""

    def __init__(self, in_features: int, num_freqs: int, act: ActivationName) -> None:
        super().__init__(nn.Linear(in_features, in_features * num_freqs), activation(act))
        self.out_features = in_features * num_freqs


class IdentityBasis(nn.Identity):
    """No expansion (``raw``): out_features = in_features."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.out_features = in_features


#: The modules :func:`scalar_basis` builds; each has an ``out_features: int``.
ScalarBasis = SinusoidalBasis | GaussianBasis | LinearActivationBasis | IdentityBasis


def scalar_basis(
    kind: ScalarBasisName, in_features: int, num_freqs: int, act: ActivationName
) -> ScalarBasis:
    """The scalar basis module called ``kind`` for ``in_features`` inputs."""
    check_choice("basis", kind, ScalarBasisName)
    if kind == "gauss":
        return GaussianBasis(in_features, num_freqs)
    if kind == "linact":
        return LinearActivationBasis(in_features, num_freqs, act)
    if kind == "raw":
        return IdentityBasis(in_features)
    return SinusoidalBasis(in_features, num_freqs, kind)


# ----------------------------------------------------------------------------- spherical harmonics


class RealSphericalHarmonics(nn.Module):
    """Orthonormal real spherical harmonics of unit vectors for degrees n < ``max_n``.

    Computed as polynomials in (x, y, z) (no angles), so they are smooth and
    differentiable everywhere and run on the input's device. With the complex
    Y_n^m (Condon-Shortley phase, as scipy), the outputs are, in this order:
    Y_n^0 for each kept n; then sqrt(2) Re Y_n^m for m > 0; then sqrt(2) Im Y_n^m for
    m > 0 (pairs (n, m) in increasing n, then m). This is the OCP ForceNet code's
    layout; the sqrt(2) makes the set orthonormal on the unit sphere.
    ``parity``: ``all`` degrees, only odd (``sine``) or only even (``cosine``) degrees.
    Input [E, 3] unit vectors -> [E, out_features] (``max_n**2`` for ``all``).
    """

    def __init__(self, max_n: int, parity: SphParity = "all") -> None:
        super().__init__()
        check_choice("parity", parity, SphParity)
        keep = {"all": lambda n: True, "sine": lambda n: n % 2 == 1, "cosine": lambda n: n % 2 == 0}
        self.degrees = [n for n in range(max_n) if keep[parity](n)]
        if not self.degrees:
            raise ValueError(f"no spherical-harmonic degree < max_n={max_n} has parity {parity}")
        self.max_n = max_n
        self.pairs = [(n, m) for n in self.degrees for m in range(1, n + 1)]
        self.out_features = len(self.degrees) + 2 * len(self.pairs)

    @staticmethod
    def _norm(n: int, m: int) -> float:
        """sqrt((2n+1)/(4 pi) (n-m)!/(n+m)!), times sqrt(2) for m > 0."""
        ratio = math.factorial(n - m) / math.factorial(n + m)
        return math.sqrt((2 * n + 1) / (4 * math.pi) * ratio) * (math.sqrt(2.0) if m else 1.0)

    def _legendre(self, z: Tensor) -> dict[tuple[int, int], Tensor]:
        """P_n^m(z) / sin^m(theta) (a polynomial in z, Condon-Shortley phase) for n < max_n."""
        p: dict[tuple[int, int], Tensor] = {}
        top = self.max_n - 1
        for m in range(top + 1):
            double_fact = math.prod(range(2 * m - 1, 0, -2))  # (2m-1)!!
            p[m, m] = torch.full_like(z, (-1.0) ** m * double_fact)
            if m + 1 <= top:
                p[m + 1, m] = (2 * m + 1) * z * p[m, m]
            for n in range(m + 2, top + 1):
                p[n, m] = ((2 * n - 1) * z * p[n - 1, m] - (n + m - 1) * p[n - 2, m]) / (n - m)
        return p

    def forward(self, u: Tensor) -> Tensor:
        x, y, z = u.unbind(-1)  # each [E]
        p = self._legendre(z)
        # Re / Im of (x + i y)^m = sin^m(theta) e^{i m phi}
        cos_m, sin_m = [torch.ones_like(x)], [torch.zeros_like(x)]
        for _ in range(1, self.max_n):
            c, s = cos_m[-1], sin_m[-1]
            cos_m.append(x * c - y * s)
            sin_m.append(x * s + y * c)
        cols = [self._norm(n, 0) * p[n, 0] for n in self.degrees]
        cols += [self._norm(n, m) * p[n, m] * cos_m[m] for n, m in self.pairs]
        cols += [self._norm(n, m) * p[n, m] * sin_m[m] for n, m in self.pairs]
        return torch.stack(cols, dim=-1)  # [E, out_features]


# ----------------------------------------------------------------------------- edge bases
# Combine a direction u [E, 3] (unit vectors) and distance features [E, k] into one
# edge-basis tensor [E, out_features].


class UnitInterval(nn.Module):
    """Maps unit-vector components from [-1, 1] to [0, 1] (for the Gaussian basis)."""

    def forward(self, u: Tensor) -> Tensor:
        return 0.5 * (u + 1.0)


class ScalarEdgeBasis(nn.Module):
    """A scalar basis applied to the raw edge attributes [direction, distances]."""

    def __init__(self, basis: ScalarBasis, direction_map: nn.Module) -> None:
        super().__init__()
        self.basis, self.direction_map = basis, direction_map
        self.out_features: int = basis.out_features

    def forward(self, u: Tensor, dists: Tensor) -> Tensor:
        return self.basis(torch.cat([self.direction_map(u), dists], dim=-1))


class DistanceEdgeBasis(nn.Module):
    """A scalar basis of the distance features only (``onlydist`` ablation)."""

    def __init__(self, basis: ScalarBasis) -> None:
        super().__init__()
        self.basis = basis
        self.out_features: int = basis.out_features

    def forward(self, u: Tensor, dists: Tensor) -> Tensor:
        return self.basis(dists)


class SphericalOuterBasis(nn.Module):
    """Outer product SH(u) x radial(dists), flattened: ``sph*mul``/``m40``/``nosine``.

    ``radial`` maps [E, k] -> [E, R] (sine basis + Linear for mul/m40, identity for nosine);
    output [E, S*R] with S spherical harmonics.
    """

    def __init__(self, sph: RealSphericalHarmonics, radial: nn.Module, radial_features: int):
        super().__init__()
        self.sph, self.radial = sph, radial
        self.out_features = sph.out_features * radial_features

    def forward(self, u: Tensor, dists: Tensor) -> Tensor:
        y = self.sph(u)  # [E, S]
        r = self.radial(dists)  # [E, R]
        return (y[:, :, None] * r[:, None, :]).flatten(1)  # [E, S*R]


class SphericalConcatBasis(nn.Module):
    """[SH(u), sine(dists)] concatenated: ``sph*cat``."""

    def __init__(self, sph: RealSphericalHarmonics, sine: SinusoidalBasis) -> None:
        super().__init__()
        self.sph, self.sine = sph, sine
        self.out_features = sph.out_features + sine.out_features

    def forward(self, u: Tensor, dists: Tensor) -> Tensor:
        return torch.cat([self.sph(u), self.sine(dists)], dim=-1)


# ----------------------------------------------------------------------------- MLP builders


def act_linear_stack(channels: int, depth: int, act: ActivationName) -> list[nn.Module]:
    """``depth`` x (activation, Linear(channels -> channels)) as a list of modules."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [activation(act), nn.Linear(channels, channels)]
    return layers


def norm_act_linear_stack(channels: int, depth: int, act: ActivationName) -> list[nn.Module]:
    """``depth`` x (BatchNorm1d, activation, Linear(channels -> channels)) as a list."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.BatchNorm1d(channels), activation(act), nn.Linear(channels, channels)]
    return layers


@torch.no_grad()
def zero_linear_(linear: nn.Linear) -> None:
    """Zero weight and bias: a decoder that ends here starts by predicting zero."""
    linear.weight.zero_()
    if linear.bias is not None:
        linear.bias.zero_()


def xavier_linears_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear inside ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- message passing


class _GatherMulScatter(torch.autograd.Function):
    """out[dst[e]] += x[src[e]] * w[w_index[e]] (``w_index`` None: ``w[e]``); see
    :func:`gather_mul_scatter`. Same ops (hence same floats) as the autograd composition
    ``zeros.index_add_(0, dst, x.index_select(0, src) * w)``, with fewer [E, F] temporaries:
    the gathered x is multiplied in place and not saved (it is re-gathered in backward)."""

    @staticmethod
    def forward(ctx, x, w, src, dst, w_index, num_nodes):
        ctx.save_for_backward(x, w, src, dst, w_index)
        w_e = w if w_index is None else w.index_select(0, w_index)  # [E, F]
        msg = x.index_select(0, src).mul_(w_e)  # [E, F]
        return x.new_zeros(num_nodes, x.shape[1]).index_add_(0, dst, msg)

    @staticmethod
    def backward(ctx, grad):
        x, w, src, dst, w_index = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # grad_x[src] += grad[dst] * w: the same pattern reversed
            grad_x = gather_mul_scatter(grad, w, dst, src, x.shape[0], w_index)
        if ctx.needs_input_grad[1]:
            grad_w = grad.index_select(0, dst).mul(x.index_select(0, src))  # [E, F]
            if w_index is not None:
                grad_w = w.new_zeros(w.shape).index_add_(0, w_index, grad_w)
        return grad_x, grad_w, None, None, None, None


def gather_mul_scatter(
    x: Tensor, w: Tensor, src: Tensor, dst: Tensor, num_nodes: int, w_index: Tensor | None = None
) -> Tensor:
    """Filtered message passing ``out[dst[e]] += x[src[e]] * w[e]`` -> [num_nodes, F].

    ``x`` [N, F] node features, ``w`` [E, F] edge filters (or [P, F] per-pair filters
    looked up as ``w[w_index[e]]``), ``src``/``dst`` [E]. Differentiable to any order (the
    backward is written with this same function and plain ops), so it also serves
    energy models trained on gradient forces.
    """
    return _GatherMulScatter.apply(x, w, src, dst, w_index, num_nodes)


# ----------------------------------------------------------- energy-centric models


def input_positions(batch: dict[str, Tensor]) -> Tensor:
    """Positions [N, 3] to differentiate: the batch's own tensor when it already
    requires grad, otherwise a detached copy that does (the batch is never mutated)."""
    pos = batch[K.POS]
    return pos if pos.requires_grad else pos.detach().clone().requires_grad_(True)


def check_atomic_numbers(z: Tensor, max_z: int, model: str) -> None:
    """Raise a clear error instead of an index error deep inside an embedding."""
    if z.numel() and (int(z.min()) < 1 or int(z.max()) > max_z):
        raise ValueError(
            f"{model}: atomic numbers must be in 1..{max_z}, got {int(z.min())}..{int(z.max())}"
        )


def energy_and_forces(
    energy_fn: Callable[[dict[str, Tensor], Tensor], Tensor],
    batch: dict[str, Tensor],
    *,
    training: bool,
) -> dict[str, Tensor]:
    """The forward of an energy-centric model: ``energy_fn(batch, pos)`` [G] (eV) and
    forces = -dE/dpos [N, 3] (eV/Å), also under ``torch.no_grad()``.

    The force graph is kept (``create_graph``) to train on forces, or when the caller
    differentiates through the model (its own ``pos`` requires grad).
    """
    grad_enabled = torch.is_grad_enabled()
    with torch.enable_grad():
        pos = input_positions(batch)
        energy = energy_fn(batch, pos)
        keep = grad_enabled and (training or batch[K.POS].requires_grad)
        forces = gradient_forces(energy, pos, create_graph=keep)
    if not grad_enabled:
        energy = energy.detach()
    return {K.ENERGY: energy, K.FORCES: forces}
