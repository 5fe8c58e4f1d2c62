"""Training: the fine-tuning loop (``train``), the training-time ``anomaly_simulation`` on healthy images, and
data-parallel processes (``distributed``)."""
