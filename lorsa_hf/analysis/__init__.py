"""Reading Lorsa heads: top activations, z-patterns, logit effects, head detectors and an offline viewer."""

from .detectors import DETECTORS, score_heads
from .logits import Attribution, LogitEffects, Unembedding, direct_logit_attribution, logit_effects
from .probes import ProbeSequences, probe_sequences, tokenizer_families
from .readings import HeadReadings, base_readings, lorsa_readings
from .store import Context, HeadActivationStore
from .stream import CorpusOptions, analyze_corpus, gather_store
from .zpattern import ZPattern, sparse_contributions, z_pattern

__all__ = [
    "DETECTORS", "Attribution", "Context", "CorpusOptions", "HeadActivationStore", "HeadReadings", "LogitEffects",
    "ProbeSequences", "Unembedding", "ZPattern", "analyze_corpus", "base_readings", "direct_logit_attribution",
    "gather_store", "logit_effects", "lorsa_readings", "probe_sequences", "score_heads", "sparse_contributions",
    "tokenizer_families", "z_pattern",
]
