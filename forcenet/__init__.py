"""forcenet: train and evaluate force-predicting graph neural networks on OC20-style data."""

__version__ = "0.1.0"
