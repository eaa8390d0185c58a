"""Reading Lorsa heads: top activations, z-patterns, logit effects, head detectors and an offline viewer."""

from .store import Context, HeadActivationStore

__all__ = ["Context", "HeadActivationStore"]
