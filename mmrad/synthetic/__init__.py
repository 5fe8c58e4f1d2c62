"""The embedded default data: a retina ``phantom`` renders paired fundus photographs and OCT B-scans with every
symptom of the paper's Table 1, ``generate`` writes them in the real MMR / IDRiD / RESC layouts (the `generate`
stage), ``contact_sheet`` shows them as one PNG.

Not to be confused with ``mmrad.training.anomaly_simulation``: the phantom draws realistic *lesions* for the test
data; the simulation fakes *anomalies* on healthy training images. Nothing but the CLI imports this package: the
pipeline reads the synthetic data only through its files, like a real download."""
