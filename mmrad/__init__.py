"""MMRAD: multi-modal retinal anomaly detection with a prompt-tuned, frozen SAM encoder.

The library is pure and importable: no orchestration, no global state. Stages
(``mmrad.synthetic``, ``mmrad.prepare``, ...) are functions that the CLI,
the DVC pipeline and the Prefect flows all call.
"""

__version__ = "0.1.0"
