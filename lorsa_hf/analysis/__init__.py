"""Reading Lorsa heads: top activations, z-patterns, logit effects, head detectors and an offline viewer."""

from .store import Context, HeadActivationStore
from .stream import CorpusOptions, analyze_corpus, gather_store

__all__ = ["Context", "CorpusOptions", "HeadActivationStore", "analyze_corpus", "gather_store"]
