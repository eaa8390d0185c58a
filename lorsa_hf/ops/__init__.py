"""The numerical kernels of a Lorsa layer, in plain torch: no model, config or transformers knowledge.

`paths.PATHS` maps `LorsaConfig.implementation` to the functions of the dense reference path or the fast
sparse path; `selection` and `decode` are also what the trainer's auxiliary loss uses.
"""
