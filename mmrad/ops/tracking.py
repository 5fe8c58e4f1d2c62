"""MLflow tracking: one run per trained model, with its lineage, metrics, artifacts and the model itself.

The ``register`` stage (last in dvc.yaml) calls ``log_and_register``: it opens
an MLflow run and logs

* params: params.yaml flattened (``train.lr``, ``model.encoder`` ...);
* metrics: the training loss per step (from loss.tsv), MMRAD's evaluation
  metrics (``fundus.pixel_auroc``, ``detection.fusion`` ...), the baselines'
  under their name (``padim.fundus.pixel_auroc``), the transfer tests under
  ``transfer.<key>`` and the retrieval diagnostic;
* artifacts: the report, every method's curves (CSV) and overlays, the curves
  and the loss as figures (PNG, ``figures/``), dvc.lock and params.yaml;
* dataset inputs: each prepared dataset with its DVC hash as the digest;
* descriptions: the run's is the report's header and Table 2, the model
  version's its headline numbers and lineage;
* the fine-tuned model as an MLflow pyfunc model (``mmrad.ops.serving``) with a
  signature and an input example, registered as a new version of
  ``tracking.model_name`` with the alias ``challenger``;
* lineage tags (``lineage_tags``): git commit and dirty flag, the DVC hashes
  of the data it was trained and tested on, a params hash, and the identity of
  the pretrained weights (or "random init").

Where it tracks: ``MLFLOW_TRACKING_URI`` when set (a server, a database);
otherwise the embedded default, a sqlite store ``mlflow.db`` with artifacts
under ``mlartifacts/`` in the project, registry included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import mlflow.pyfunc
import yaml
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric

from mmrad.core.errors import DataError
from mmrad.core.outputs import atomic_write_text
from mmrad.core.provenance import code_state, orchestrator_tags
from mmrad.evaluation.compare import REPLICATES, SCORES
from mmrad.evaluation.figures import curve_figures, loss_figure
from mmrad.evaluation.methods import BASELINES, MAIN
from mmrad.models.builder import MODEL_FILE
from mmrad.ops import serving

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
UNTRACKED = "untracked"  # the data tag of a dataset that dvc.lock does not list


# --------------------------------------------------------------------------- where

def embedded_uri(project: str | Path = ".") -> str:
    """The embedded default store: sqlite ``mlflow.db`` in the project."""
    return f"sqlite:///{(Path(project).resolve() / EMBEDDED_DB).as_posix()}"


def tracking_uri(project: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI, or the embedded sqlite store of the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(project)


# MLflow's own HTTP defaults (several retries with exponential backoff, a 120 s request timeout) take minutes to
# give up on a server that is down; these bound it to seconds. Set in the environment, they are the user's.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
REACH_SECONDS = 5.0  # the first contact: an unreachable server is reported after this, with its URI


def check_reachable(uri: str, timeout: float = REACH_SECONDS) -> None:
    """A one-line DataError naming ``uri`` when an HTTP tracking server does not answer (other stores: no-op)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (an authenticating proxy, an older server): reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(uri, "the MLflow tracking server is unreachable",
                        f"{reason}; check MLFLOW_TRACKING_URI or start the server (infra/compose.yaml)") from exc


def use_tracking(project: str | Path = ".") -> str:
    """Point MLflow (tracking and registry) at ``tracking_uri``, after checking a server answers; returns it."""
    uri = tracking_uri(project)
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, project: str | Path = ".") -> str:
    """The experiment's id, created on first use (embedded store: artifacts under mlartifacts/)."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if mlflow.get_tracking_uri() == embedded_uri(project):  # (set_tracking_uri also sets MLFLOW_TRACKING_URI)
        location = (Path(project).resolve() / EMBEDDED_ARTIFACTS / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a concurrent process
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# --------------------------------------------------------------------------- what

def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def params_hash(params) -> str:
    """sha256 of the validated parameters in canonical JSON (key order and comments do not matter)."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dvc_out_hashes(lock_file: str | Path) -> dict[str, str]:
    """{output path: md5} of every stage output recorded in dvc.lock."""
    lock_file = Path(lock_file)
    if not lock_file.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(lock_file, "dvc.lock is not valid YAML", str(exc).replace("\n", " ")) from exc
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if "md5" in out:
                hashes[out["path"]] = out["md5"]
    return hashes


def lineage_tags(params, project: str | Path, weights_identity: dict | None) -> dict[str, str]:
    """Tags that trace a run to its code, data, params and pretrained weights."""
    project = Path(project)
    commit, dirty = code_state(project)
    hashes = dvc_out_hashes(project / "dvc.lock")
    tags = {
        "mmrad.git_commit": commit or "unknown (not a git repository)",
        "mmrad.git_dirty": "unknown" if dirty is None else str(dirty).lower(),
        "mmrad.params_hash": params_hash(params),
        "mmrad.train_dataset": params.train.dataset,
    }
    for name, source in params.datasets.items():
        prepared = f"data/prepared/{name}"
        tags[f"mmrad.data.{name}"] = hashes.get(prepared, UNTRACKED)
        tags[f"mmrad.data.{name}.root"] = source.root
    weights_identity = weights_identity or {}
    tags["mmrad.weights.sam"] = str(weights_identity.get("sam", "unknown"))
    tags["mmrad.weights.resnets"] = ", ".join(map(str, weights_identity.get("resnets", []))) or "none"
    return tags


def evaluation_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """metrics.json of an evaluation -> flat MLflow metrics (localisation, detection, retrieval)."""
    flat: dict[str, float] = {}
    for modality, values in result.get("localisation", {}).items():
        for key, value in values.items():
            flat[f"{prefix}{modality}.{key}"] = float(value)
    for key, value in result.get("detection", {}).items():
        flat[f"{prefix}detection.{key}"] = float(value)
    for key, value in result.get("retrieval", {}).items():
        flat[f"{prefix}retrieval.{key}"] = float(value)
    ci = result.get("ci95", {})  # each metric's 95 % interval beside it: <metric>.ci_low / .ci_high
    bounds = [(f"{m}.{k}", b) for m, values in ci.get("localisation", {}).items() for k, b in values.items()]
    bounds += [(f"detection.{k}", b) for k, b in ci.get("detection", {}).items()]
    for name, bound in bounds:
        flat[f"{prefix}{name}.ci_low"], flat[f"{prefix}{name}.ci_high"] = float(bound["low"]), float(bound["high"])
    return flat


def collect_metrics(reports: Path, trained: dict) -> dict[str, float]:
    """Everything the pipeline measured, as flat MLflow metrics (``trained``: the train stage's metrics.json;
    missing optional files are skipped)."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    main = reports / MAIN / "metrics.json"
    if not main.is_file():
        raise DataError(main, "MMRAD evaluation metrics are missing (run the evaluate stage first)")
    flat = evaluation_metrics(read(main))
    for baseline in BASELINES:
        flat.update(evaluation_metrics(read(reports / baseline / "metrics.json"), f"{baseline}."))
    for path in sorted((reports / "transfer").glob("*/metrics.json")):
        flat.update(evaluation_metrics(read(path), f"transfer.{path.parent.name}."))
    for key in ("final_loss", "seconds", "steps"):
        if isinstance(trained.get(key), (int, float)):
            flat[f"train.{key}"] = float(trained[key])
    return flat


EVIDENCE = "evidence"
FIGURES = "figures"
SUMMARY_CHARS = 6000  # MLflow shows a run's description above its details: the report's header and Table 2


def report_summary(report: Path) -> str:
    """The run's description: the report up to the end of its first table (what the run is, the headline
    numbers with their intervals); the whole report is an artifact."""
    if not report.is_file():
        return "No report (the report stage did not run)."
    text = report.read_text()
    sections = text.split("\n## ")
    summary = "\n## ".join(sections[:2]).strip()
    return summary[:SUMMARY_CHARS] + "\n\n(The full report is the run's artifact report.md.)"


def version_description(metrics: dict[str, float], tags: dict[str, str], run_id: str) -> str:
    """A model version's description: its headline numbers and where it came from."""
    def figure(key: str) -> str:
        if key not in metrics:
            return "n/a"
        low, high = metrics.get(f"{key}.ci_low"), metrics.get(f"{key}.ci_high")
        return f"{metrics[key]:.4f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")

    dataset = tags.get("mmrad.train_dataset", "?")
    return (f"Detection AUROC (fusion) {figure('detection.fusion')}; pixel AUROC fundus "
            f"{figure('fundus.pixel_auroc')}, OCT {figure('oct.pixel_auroc')} (95 % intervals: case bootstrap). "
            f"Trained on {dataset} (DVC {tags.get(f'mmrad.data.{dataset}', '?')[:12]}), "
            f"commit {tags.get('mmrad.git_commit', '?')[:12]}, weights: {tags.get('mmrad.weights.sam', '?')}. "
            f"MLflow run {run_id}.")


def log_datasets(params, tags: dict[str, str], project: Path) -> None:
    """Each prepared dataset as an MLflow dataset input: its folder, its DVC hash (``lineage_tags``) as the
    digest; a dataset dvc.lock does not track is left out."""
    for name, source in params.datasets.items():
        prepared, md5 = f"data/prepared/{name}", tags.get(f"mmrad.data.{name}", UNTRACKED)
        if md5 == UNTRACKED:
            continue
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local folder is a local folder
            warnings.simplefilter("ignore", UserWarning)
            where = resolve_dataset_source(str((project / prepared).resolve()))
        role = "training" if name == params.train.dataset else "transfer testing"
        mlflow.log_input(MetaDataset(where, name=f"{name} (prepared)", digest=md5[:36]), context=role,
                         tags={"dvc.md5": md5, "raw_root": source.root})


def evidence_folders(reports: Path) -> dict[str, Path]:
    """Evaluation folders by the prefix their metrics carry in MLflow (``mmrad`` for MMRAD's own, unprefixed)."""
    folders = {MAIN: reports / MAIN, **{b: reports / b for b in BASELINES}}
    folders.update({f"transfer.{p.name}": p for p in sorted((reports / "transfer").glob("*")) if p.is_dir()})
    return {name: path for name, path in folders.items() if (path / SCORES).is_file()}


def loss_history(loss_tsv: Path) -> list[tuple[int, dict[str, float]]]:
    """[(step, {column: value})] from the training stage's loss.tsv."""
    if not loss_tsv.is_file():
        return []
    lines = loss_tsv.read_text().splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        values = dict(zip(header, line.split("\t")))
        step = int(values.pop("step"))
        rows.append((step, {f"train.{k}": float(v) for k, v in values.items()}))
    return rows


# --------------------------------------------------------------------------- the register stage

def log_and_register(params, project: str | Path = ".", model_dir: str | Path = "models/mmrad",
                     reports: str | Path = "reports", out: str | Path = "models/registered.json",
                     params_file: str | Path = "params.yaml") -> dict:
    """Log the pipeline's run to MLflow, register the model as ``challenger``; write ``out`` (ids)."""
    project, model_dir, reports = Path(project), Path(model_dir), Path(reports)
    model_file = model_dir / MODEL_FILE
    if not model_file.is_file():
        raise DataError(model_file, "trained model is missing (run the train stage first)")
    trained = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").is_file() else {}
    metrics = collect_metrics(reports, trained)
    uri = use_tracking(project)
    experiment_id = ensure_experiment(params.tracking.experiment, project)
    client = MlflowClient()
    tags = lineage_tags(params, project, trained.get("weights"))
    artifacts = {"model": str(model_file), "params": str(params_file)}
    if params.weights.sam is not None:
        artifacts["weights_sam"] = params.weights.sam.path
    for i, entry in enumerate(params.weights.resnets):
        if entry is not None:
            artifacts[f"weights_resnet{i}"] = entry.path
    size = params.model.image_size
    tags.update(orchestrator_tags())  # the Prefect flow run that runs this stage, when one does
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{params.tracking.model_name} "
                          f"{tags['mmrad.git_commit'][:8]}", tags=tags,
                          description=report_summary(reports / "report.md")) as run:
        flat_params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
                       for k, v in flatten(params.model_dump(mode="json")).items()}
        mlflow.log_params(flat_params)
        history = loss_history(model_dir / "loss.tsv")
        timestamp = int(run.info.start_time)
        per_step = [Metric(key, value, timestamp, step) for step, row in history for key, value in row.items()]
        for start in range(0, len(per_step), 1000):  # the store takes at most 1000 metrics per batch
            client.log_batch(run.info.run_id, metrics=per_step[start:start + 1000])
        mlflow.log_metrics(metrics)
        log_datasets(params, tags, project)
        for name, folder in evidence_folders(reports).items():  # per-case scores + replicates: the gate's paired tests
            for file in (SCORES, REPLICATES):
                if (folder / file).is_file():
                    mlflow.log_artifact(str(folder / file), f"{EVIDENCE}/{name}")
            for kind in ("plots", "overlays"):  # every method's curves (CSV) and overlays (PNG)
                if (folder / kind).is_dir():
                    mlflow.log_artifacts(str(folder / kind), f"{kind}/{name}")
        for path in (reports / "report.md", project / "dvc.lock", Path(params_file)):
            if path.is_file():
                mlflow.log_artifact(str(path))
        for file, figure in curve_figures(reports).items():  # the curves as images, every method in one figure
            mlflow.log_figure(figure, f"{FIGURES}/{file}")
            plt.close(figure)
        if (figure := loss_figure(model_dir / "loss.tsv")) is not None:
            mlflow.log_figure(figure, f"{FIGURES}/loss.png")
            plt.close(figure)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(serving.MODEL_CODE), artifacts=artifacts,
            code_paths=[str(serving.PACKAGE)], signature=serving.model_signature(size),
            input_example=serving.input_example(project / "data" / "prepared" / params.train.dataset, size),
            pip_requirements=serving.pip_requirements())
        run_id = run.info.run_id
    version = mlflow.register_model(info.model_uri, params.tracking.model_name, tags=tags)
    client.update_model_version(params.tracking.model_name, version.version,
                                description=version_description(metrics, tags, run_id=run.info.run_id))
    client.set_registered_model_alias(params.tracking.model_name, CHALLENGER, version.version)
    record = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id,
              "model_name": params.tracking.model_name, "version": int(version.version),
              "model_uri": f"models:/{params.tracking.model_name}/{version.version}"}
    atomic_write_text(Path(out), json.dumps(record, indent=2) + "\n")
    log.info("registered %s version %s as %s (run %s, %s)", record["model_name"], record["version"],
             CHALLENGER, run_id, uri)
    return record
