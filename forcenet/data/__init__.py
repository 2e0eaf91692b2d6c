"""Data path: raw OC20-layout frames -> LMDB of plain arrays -> neighbor lists -> batches."""
