"""Models: MMRAD (``mmrad``), its ``builder`` (params -> model, weights, the fine-tuned model file), the official
checkpoint loaders (``weights``) and the comparison methods (``baselines``: PaDiM, PatchCore)."""
