"""Training losses on normalised labels, as (weighted sum, weight) pairs.

Every loss term is returned as a numerator (a weighted sum of per-element errors) and a
denominator (the total weight), not as a mean. The caller divides by the denominator summed
over all data-parallel ranks, so that the averaged gradients of a DDP run equal the gradient
of one global mean over the whole (multi-rank) batch -- the OCP convention for the ForceNet
tag-weighted loss.

Labels are compared in normalised units: forces divided by ``force_scale`` (eV/Å) and
energies as ``(E - energy_shift) / energy_scale``. The model wrapper
:class:`forcenet.checkpoint.ScaledModel` outputs physical units, so the loss divides both
prediction and target by the same scale; the minimiser is unchanged but the loss is O(1)
and scale-dependent losses (smooth L1's ``beta``) act at a sensible point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from forcenet.data import keys as K

ForceLossKind = Literal["l1", "l2", "smooth_l1", "l2norm", "berhu"]
LossAtoms = Literal["tag_weighted", "free"]

#: OC20 ForceNet weights for tags 0 (sub-surface), 1 (surface), 2 (adsorbate).
FORCENET_TAG_WEIGHTS = (0.05, 1.0, 1.0)


@dataclass(frozen=True)
class LossTerm:
    """A weighted error sum ``total`` and its weight ``weight``; the loss is total / weight."""

    total: Tensor  # [] differentiable
    weight: Tensor  # [] no grad


def atom_weights(
    tags: Tensor, fixed: Tensor, *, atoms: LossAtoms, tag_weights: tuple[float, ...]
) -> Tensor:
    """Per-atom loss weights [N].

    ``"tag_weighted"``: ``tag_weights[tag]`` for every atom, fixed ones included (ForceNet,
    Hu et al. 2021). ``"free"``: 1 for free atoms, 0 for fixed ones (OCP energy models).
    """
    if atoms == "free":
        return (~fixed).to(torch.float32)
    if atoms == "tag_weighted":
        table = torch.as_tensor(tag_weights, dtype=torch.float32, device=tags.device)
        if int(tags.min()) < 0 or int(tags.max()) >= len(table):
            raise ValueError(f"tags must be in 0..{len(table) - 1}, got {tags.unique().tolist()}")
        return table[tags]
    raise ValueError(f"atoms must be 'tag_weighted' or 'free', got {atoms!r}")


def per_atom_force_error(
    pred: Tensor, target: Tensor, kind: ForceLossKind, beta: float = 1.0
) -> Tensor:
    """Per-atom error [N] between normalised forces [N, 3].

    ``l1``: mean |dF| over xyz; ``l2``: mean dF^2 over xyz; ``smooth_l1``: Huber (quadratic
    below ``beta``, linear above; in normalised units), mean over xyz; ``l2norm``: the
    Euclidean norm |dF| (OCP's "l2mae"); ``berhu``: the reverse Huber loss, |dF| below
    ``beta`` and (dF^2 + beta^2) / (2 beta) above, mean over xyz. berHu keeps L1's
    median-seeking gradient on small errors but weights large errors by their size, so
    the few large, predictable forces of a heavy-tailed set (adsorbate bonds) are not
    drowned by the many small ones.
    """
    if beta <= 0:
        raise ValueError(f"loss beta must be > 0, got {beta}")
    diff = pred - target  # [N, 3]
    if kind == "l1":
        return diff.abs().mean(dim=-1)
    if kind == "l2":
        return diff.square().mean(dim=-1)
    if kind == "smooth_l1":
        a = diff.abs()
        return torch.where(a < beta, 0.5 * a.square() / beta, a - 0.5 * beta).mean(dim=-1)
    if kind == "berhu":
        a = diff.abs()
        return torch.where(a <= beta, a, (a.square() + beta * beta) / (2 * beta)).mean(dim=-1)
    if kind == "l2norm":
        # sqrt with a floor so the gradient at an exact zero error stays finite
        return (diff.square().sum(dim=-1) + 1e-12).sqrt()
    raise ValueError(f"unknown force loss {kind!r}")


def force_loss(
    pred: Tensor,
    target: Tensor,
    weights: Tensor,
    *,
    kind: ForceLossKind,
    force_scale: float,
    beta: float = 1.0,
) -> LossTerm:
    """Weighted force loss on forces divided by ``force_scale`` (eV/Å); pred/target [N, 3]."""
    err = per_atom_force_error(pred.float() / force_scale, target.float() / force_scale, kind, beta)
    return LossTerm(total=(weights * err).sum(), weight=weights.sum().detach())


def energy_loss(
    pred: Tensor, target: Tensor, *, energy_shift: float, energy_scale: float
) -> LossTerm:
    """L1 on normalised per-structure energies; pred/target [G] (eV)."""
    p = (pred.float() - energy_shift) / energy_scale
    t = (target.float() - energy_shift) / energy_scale
    return LossTerm(total=(p - t).abs().sum(), weight=torch.tensor(float(p.numel())))


@dataclass(frozen=True)
class TrainLoss:
    """The training objective: ``force_coef * force term + energy_coef * energy term``.

    ``energy_coef`` 0 means force-only (ForceNet, GNS). The energy term is used only when
    the model returns an energy. Normalisation constants come from the training set.
    """

    kind: ForceLossKind
    atoms: LossAtoms
    tag_weights: tuple[float, ...]
    force_coef: float
    energy_coef: float
    force_scale: float
    energy_shift: float
    energy_scale: float
    beta: float = 1.0  # smooth_l1 / berhu transition, normalised units
    adsorbate_kind: ForceLossKind | None = None  # loss of tag-2 atoms (None: ``kind``)
    adsorbate_beta: float | None = None  # its transition (None: ``beta``)

    def terms(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, LossTerm]:
        """The loss terms of one batch (model output ``out``, labels in ``batch``)."""
        w = atom_weights(
            batch[K.TAGS], batch[K.FIXED], atoms=self.atoms, tag_weights=self.tag_weights
        ).to(out[K.OUT_FORCES].device)
        ads_kind = self.adsorbate_kind or self.kind
        ads_beta = self.beta if self.adsorbate_beta is None else self.adsorbate_beta
        if ads_kind == self.kind and ads_beta == self.beta:
            force = force_loss(
                out[K.OUT_FORCES],
                batch[K.FORCES],
                w,
                kind=self.kind,
                force_scale=self.force_scale,
                beta=self.beta,
            )
        else:
            pred = out[K.OUT_FORCES].float() / self.force_scale
            target = batch[K.FORCES].float() / self.force_scale
            ads = batch[K.TAGS].to(pred.device) == 2
            err = torch.where(
                ads,
                per_atom_force_error(pred, target, ads_kind, ads_beta),
                per_atom_force_error(pred, target, self.kind, self.beta),
            )
            force = LossTerm(total=(w * err).sum(), weight=w.sum().detach())
        terms = {"force": force}
        if K.OUT_ENERGY in out:
            terms["energy"] = energy_loss(
                out[K.OUT_ENERGY],
                batch[K.ENERGY],
                energy_shift=self.energy_shift,
                energy_scale=self.energy_scale,
            )
        return terms

    def combine(self, terms: dict[str, LossTerm], weights: dict[str, Tensor]) -> Tensor:
        """Scalar loss from ``terms`` given each term's (possibly all-reduced) total weight.

        An energy term with coefficient 0 still enters as ``0 * term`` so every parameter of
        the energy head gets a (zero) gradient: DDP fails on parameters that take part in
        the forward pass but receive no gradient (PyTorch's DistributedDataParallel
        reducer expects a gradient for every parameter it tracks).
        """
        coefs = {"force": self.force_coef, "energy": self.energy_coef}
        loss = torch.zeros((), device=terms["force"].total.device)
        for name, term in terms.items():
            loss = loss + coefs[name] * term.total / weights[name].clamp(min=1e-12)
        return loss
