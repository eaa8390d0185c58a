"""Reading Lorsa heads: top activations, z-patterns, logit effects, head detectors and an offline viewer."""

from .detectors import DETECTORS, score_heads
from .logits import Attribution, LogitEffects, Unembedding, direct_logit_attribution, logit_effects
from .pipeline import AnalysisOptions, analyze_layer
from .probes import ProbeSequences, probe_sequences, tokenizer_families
from .readings import HeadReadings, base_readings, lorsa_readings
from .report import ReportOptions
from .store import Context, HeadActivationStore
from .stream import CorpusOptions, analyze_corpus, gather_store
from .viewer import render_viewer, write_viewer, write_z_pattern_heatmap
from .zpattern import ZPattern, sparse_contributions, z_pattern

__all__ = [
    "DETECTORS", "AnalysisOptions", "Attribution", "Context", "CorpusOptions", "HeadActivationStore", "HeadReadings",
    "LogitEffects", "ProbeSequences", "ReportOptions", "Unembedding", "ZPattern", "analyze_corpus", "analyze_layer",
    "base_readings", "direct_logit_attribution", "gather_store", "logit_effects", "lorsa_readings", "probe_sequences",
    "render_viewer", "score_heads", "sparse_contributions", "tokenizer_families", "write_viewer",
    "write_z_pattern_heatmap", "z_pattern",
]
