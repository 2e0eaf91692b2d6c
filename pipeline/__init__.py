"""The DVC pipeline: one module per stage of ``dvc.yaml``, run as ``python -m pipeline.<stage>``.

Each stage reads ``params.yaml`` once (:mod:`pipeline.params`), calls the ``forcenet``
library and records the run in MLflow (:mod:`pipeline.tracking`). The library never
imports from here.
"""
