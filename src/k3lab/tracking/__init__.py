"""Experiment tracking: MLflow run metadata, config and image artifacts."""

from k3lab.tracking.mlflow import find_mlflow_logger, log_image, log_run_metadata, log_tag

__all__ = ["find_mlflow_logger", "log_image", "log_run_metadata", "log_tag"]
