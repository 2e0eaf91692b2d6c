"""Training: one loop (:mod:`forcenet.train.loop`) a reader can follow on one screen.

* :mod:`~forcenet.train.config`: the hyperparameters (:class:`TrainConfig`) and the loss
  and learning-rate schedule they define;
* :mod:`~forcenet.train.data`: the dev slice, the training batches in their reproducible
  order, the dev evaluation;
* :mod:`~forcenet.train.step`: one optimizer step and the dev metrics;
* :mod:`~forcenet.train.state`: where a run stands and what it starts or resumes from;
* :mod:`~forcenet.train.conservative`: the switch to forces = -dE/dpos;
* :mod:`~forcenet.train.log`: what a person reads while it runs.

The label normalisation the model carries is :mod:`forcenet.scaling`.
"""

from forcenet.train.config import TrainConfig
from forcenet.train.loop import EpochCallback, fit, fit_datasets
from forcenet.train.step import NonFiniteError, evaluate, train_step

__all__ = [
    "EpochCallback",
    "NonFiniteError",
    "TrainConfig",
    "evaluate",
    "fit",
    "fit_datasets",
    "train_step",
]
