"""Reading Lorsa heads: top activations, z-patterns, logit effects, head detectors and an offline viewer."""

from .logits import Attribution, LogitEffects, Unembedding, direct_logit_attribution, logit_effects
from .store import Context, HeadActivationStore
from .stream import CorpusOptions, analyze_corpus, gather_store

__all__ = [
    "Attribution", "Context", "CorpusOptions", "HeadActivationStore", "LogitEffects", "Unembedding",
    "analyze_corpus", "direct_logit_attribution", "gather_store", "logit_effects",
]
