"""MMRAD: multi-modal retinal anomaly detection with a prompt-tuned, frozen SAM encoder.

The library is pure and importable: no orchestration, no global state. Each
pipeline stage is a library function that the CLI (``mmrad.cli``), dvc.yaml
and the Prefect flows (``flows/``) all call. Subpackages, from the bottom up
(a module imports only from its own layer and the ones below; import-linter
checks it, see pyproject.toml and docs/architecture.md):

* ``core``: errors, params.yaml, files and images;
* ``data``: dataset layouts, prepare, the prepared splits;
* ``models`` and ``synthetic`` (independent of each other): MMRAD, its builder
  and weights, the baselines; the phantom and the synthetic default data;
* ``training`` and ``evaluation`` (independent of each other): the train loop;
  methods, inference, metrics, report;
* ``ops``: MLflow tracking, the registry, serving, predict;
* ``cli``: the ``mmrad`` command.
"""

__version__ = "0.1.0"
