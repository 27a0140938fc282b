"""`anysat evaluate`: probes on real labels (crop types, land cover) comparing raw inputs,
the model with random weights and the pretrained checkpoint."""

from .report import evaluate, markdown_table

__all__ = ["evaluate", "markdown_table"]
