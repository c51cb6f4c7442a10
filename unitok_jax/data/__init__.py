"""Data: speech manifests and grain input pipelines for training."""
