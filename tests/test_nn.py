"""Shared layers: spherical harmonics against closed forms, scipy and orthonormality;
basis layouts; activation formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import sph_harm_y

from forcenet.nn import (
    ActivationName,
    GaussianBasis,
    RealSphericalHarmonics,
    ScalarBasisName,
    SinusoidalBasis,
    activation,
    scalar_basis,
)


def _unit_vectors(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _sphere_quadrature(n_theta: int = 12, n_phi: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [P, 3] and weights [P] integrating polynomials of degree < 2 n_theta exactly."""
    cos_t, w_t = np.polynomial.legendre.leggauss(n_theta)
    phi = np.arange(n_phi) * 2 * np.pi / n_phi
    ct, ph = np.meshgrid(cos_t, phi, indexing="ij")
    st = np.sqrt(1 - ct**2)
    pts = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3)
    w = (w_t[:, None] * np.full(n_phi, 2 * np.pi / n_phi)[None, :]).reshape(-1)
    return torch.from_numpy(pts), torch.from_numpy(w)


def test_sph_closed_forms_degrees_0_to_2() -> None:
    u = _unit_vectors(50)
    x, y, z = u.unbind(1)
    got = RealSphericalHarmonics(3)(u)  # layout: Y00 Y10 Y20 | c11 c21 c22 | s11 s21 s22
    c1, c2 = math.sqrt(3 / (4 * math.pi)), math.sqrt(15 / (4 * math.pi))
    c2b = math.sqrt(15 / (16 * math.pi))
    expected = torch.stack(
        [
            torch.full_like(x, 0.5 / math.sqrt(math.pi)),
            c1 * z,
            math.sqrt(5 / (16 * math.pi)) * (3 * z**2 - 1),
            -c1 * x,
            -c2 * x * z,
            c2b * (x**2 - y**2),
            -c1 * y,
            -c2 * y * z,
            c2 * x * y,
        ],
        dim=1,
    )
    assert got.shape == (50, 9)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_sph_matches_scipy_complex_harmonics_in_reference_layout() -> None:
    u = _unit_vectors(40, seed=1)
    sph = RealSphericalHarmonics(5)
    got = sph(u).numpy()
    theta = np.arccos(u[:, 2].numpy())
    phi = np.arctan2(u[:, 1].numpy(), u[:, 0].numpy())
    cols = [sph_harm_y(n, 0, theta, phi).real for n in range(5)]
    cplx = [sph_harm_y(n, m, theta, phi) for n, m in sph.pairs]
    cols += [math.sqrt(2) * c.real for c in cplx] + [math.sqrt(2) * c.imag for c in cplx]
    np.testing.assert_allclose(got, np.stack(cols, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("max_n", [1, 3, 5])
def test_sph_orthonormal_on_the_sphere(max_n) -> None:
    pts, w = _sphere_quadrature()
    y = RealSphericalHarmonics(max_n)(pts)  # [P, max_n^2]
    gram = y.t() @ (w[:, None] * y)
    assert y.shape[1] == max_n**2
    torch.testing.assert_close(gram, torch.eye(max_n**2, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("parity", "sign", "count"), [("sine", -1.0, 3 + 7), ("cosine", 1.0, 1 + 5)]
)
def test_sph_parity_options_keep_odd_or_even_degrees(parity, sign, count) -> None:
    u = _unit_vectors(20, seed=2)
    sph = RealSphericalHarmonics(4, parity)  # degrees < 4: odd = {1, 3}, even = {0, 2}
    assert sph.out_features == count
    torch.testing.assert_close(sph(-u), sign * sph(u))  # Y_n(-u) = (-1)^n Y_n(u)


def test_sph_rejects_empty_degree_set() -> None:
    with pytest.raises(ValueError, match="no spherical-harmonic degree"):
        RealSphericalHarmonics(1, "sine")


def test_sph_gradient_finite_at_the_poles() -> None:
    u = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    u.requires_grad_(True)
    RealSphericalHarmonics(4)(u).square().sum().backward()
    assert torch.isfinite(u.grad).all()
    assert torch.autograd.gradcheck(RealSphericalHarmonics(3), (_unit_vectors(4).requires_grad_(),))


def test_powersine_layout_is_frequency_major() -> None:
    x = torch.tensor([[0.1, 0.7, 0.3]], dtype=torch.float64)
    out = SinusoidalBasis(3, 4)(x)
    freqs = 1.1 ** torch.arange(4, dtype=torch.float64)
    expected = torch.sin((freqs[:, None] * x[0][None, :]).reshape(1, -1))  # f0 x0..x2, f1 ...
    assert out.shape == (1, 12)
    torch.testing.assert_close(out, expected)
    fourier = SinusoidalBasis(3, 4, "fouriersine")(x)
    assert torch.all(fourier[:, :3] == 0)  # frequency 0 first
    torch.testing.assert_close(fourier[:, 3:6], torch.sin(x))
    torch.testing.assert_close(SinusoidalBasis(3, 4, "powercosine")(x), torch.cos(expected.asin()))


def test_gaussian_basis_peaks_at_its_centres() -> None:
    basis = GaussianBasis(2, 5)  # centres 0, .25, .5, .75, 1; width .25
    x = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    out = basis(x).reshape(5, 2)  # [centre, feature]
    assert out[2, 0] == 1.0 and out[4, 1] == 1.0
    torch.testing.assert_close(out[3, 0], torch.tensor(math.exp(-0.5), dtype=torch.float64))


@pytest.mark.parametrize("kind", ScalarBasisName.__args__)
def test_scalar_basis_shapes(kind) -> None:
    basis = scalar_basis(kind, 7, 6, "swish")
    out = basis(torch.rand(11, 7))
    assert out.shape == (11, basis.out_features)
    assert basis.out_features == (7 if kind == "raw" else 42)
    assert torch.isfinite(out).all()


def test_scalar_basis_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="basis must be one of"):
        scalar_basis("bessel", 3, 4, "swish")


def test_activation_formulas() -> None:
    x = torch.linspace(-6, 6, 25, dtype=torch.float64)
    neg = 0.05 * torch.relu(-x)
    expected = {
        "swish": x * torch.sigmoid(x),
        "ssp": F.softplus(x) - math.log(2),
        "relu": torch.relu(x),
        "sp": F.softplus(x),
        "elu": F.elu(x),
        "tanh": torch.tanh(x),
        "leaky_relu": torch.relu(x) - neg,
        "leaky_sp": F.softplus(x) - neg,
        "leaky_ssp": F.softplus(x) - math.log(2) - neg,
        "leaky_elu": F.elu(x) - neg,
        "leaky_tanh": torch.tanh(x) + 0.05 * x,
    }
    assert set(expected) == set(ActivationName.__args__)
    for name, value in expected.items():
        torch.testing.assert_close(activation(name)(x), value, msg=name)
    assert activation("ssp")(torch.zeros(1)).item() == 0.0
    with pytest.raises(ValueError, match="activation must be one of"):
        activation("gelu")
