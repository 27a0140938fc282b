"""`anysat evaluate`: probes on real labels (crop types, land cover) comparing raw inputs,
the model with random weights and the pretrained checkpoint."""

from .report import DEFAULT_CHECKPOINT, evaluate, markdown_table

__all__ = ["DEFAULT_CHECKPOINT", "evaluate", "markdown_table"]
