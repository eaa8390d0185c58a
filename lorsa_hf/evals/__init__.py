"""Evals of a Lorsa: reconstruction at each replaced block, downstream loss of the spliced model, lm-eval deltas,
and the report and model card written from them. `evaluate_lorsa` runs them all."""
