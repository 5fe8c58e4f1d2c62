"""The paper's ablation studies (Sec. 5, Tables 4, 6, 7, 8, 9, 10, 12, 14) as one resumable grid.

Each table row is a **variant**: a few params.yaml values changed from the
project's (``VARIANTS``; the default is the paper's proposed setting, shared
by every table). ``run_grid`` trains and evaluates each variant once per seed
of ``ablation.seeds`` on the same prepared MMR, with the training steps of the
profile (``PROFILES``), through the same ``train`` and ``score_mmrad`` /
``evaluate_predictions`` the pipeline's stages run. A finished run is a folder
``runs/<variant>/seed-<seed>/`` (metrics.json + the case-bootstrap replicates,
written atomically); a rerun skips every finished run whose fingerprint
matches and resumes a training from its checkpoint, so an interrupted grid
goes on where it stopped. Each finished run is logged once to MLflow, in the
experiment ``<tracking.experiment>-ablations`` (never registered as a model
version).

``render`` writes reports/ablations.md: each table in the paper's shape, ours
as the mean over seeds with a 95 % interval that resamples the test cases and
the seeds (``uncertainty.seed_mean``), the paper's number beside it, and per
row the paired p-value against the table's reference row (the same case
resamples for every run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from PIL import Image

from mmrad.core.errors import DataError
from mmrad.core.outputs import atomic_dir, atomic_file, atomic_write_text, claim_folder
from mmrad.core.params import Params
from mmrad.evaluation import uncertainty
from mmrad.evaluation.compare import REPLICATES
from mmrad.evaluation.evaluate import evaluate_predictions, write_replicates
from mmrad.evaluation.scorers import score_mmrad
from mmrad.models.builder import MODEL_FILE
from mmrad.ops.tracking import ensure_experiment, flatten, use_tracking
from mmrad.training.train import CHECKPOINT, read_checkpoint, train, training_fingerprint

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- what runs

# The profiles: params changed for every run of the grid. quick: the CPU model of params.yaml, fewer steps;
# paper: the paper's encoder, resolution and CNNs (a GPU; docs/benchmarks.md estimates the cost).
PROFILES = {
    "quick": lambda p: {"train.steps": p.ablation.quick_steps},
    "paper": lambda p: {"model.encoder": "vit_b", "model.image_size": 1024, "prepare.resolution": 1024,
                        "model.cnn": "resnet50"},
}


@dataclass(frozen=True)
class Variant:
    title: str
    changes: dict = field(default_factory=dict)  # dotted params.yaml key -> value
    needs_weights: bool = False  # runs only with weights.resnets configured (a pretrained CNN)


VARIANTS = {
    "default": Variant("the paper's proposed setting (params.yaml)"),
    # Table 4: the anomaly transform of the simulation
    "color_jitter": Variant("colour jitter", {"simulation.transforms": "color_jitter"}),
    "channel_shuffle": Variant("channel shuffle", {"simulation.transforms": "channel_shuffle"}),
    "rgb_shift": Variant("RGBShift", {"simulation.transforms": "rgb_shift"}),
    "rotate": Variant("rotate", {"simulation.transforms": "rotate"}),
    # Table 6: one modality of the pairs
    "train_fundus": Variant("fundus-only training", {"train.modalities": ["fundus"]}),
    "train_oct": Variant("OCT-only training", {"train.modalities": ["oct"]}),
    # Table 7: the low-level features and the prompt generator's sharing
    "pretrained_cnn": Variant("pretrained CNN", needs_weights=True),
    "share_none": Variant("no shared weights", {"model.prompt_sharing": "none"}),
    "share_ln_i": Variant("shared LN_1..LN_n only", {"model.prompt_sharing": "ln_i"}),
    "share_all": Variant("shared LN_s and LN_1..LN_n", {"model.prompt_sharing": "all"}),
    # Table 8: the tuning method (EVP is Table 7's "Fourier transform" row as well)
    "decoder_only": Variant("decoder only", {"model.tuning": "decoder_only"}),
    "vpt": Variant("VPT (deep)", {"model.tuning": "vpt"}),
    "adaptformer": Variant("AdaptFormer", {"model.tuning": "adaptformer"}),
    "evp": Variant("EVP (Fourier high frequencies)", {"model.tuning": "evp"}),
    # Table 9: what the modalities share
    "separate_mask_token": Variant("shared decoder only", {"model.mask_token_sharing": "separate"}),
    "separate_decoder": Variant("shared mask token only", {"model.decoder_sharing": "separate"}),
    # Table 10: the loss
    "focal": Variant("focal", {"train.loss": "focal"}),
    "dice": Variant("dice", {"train.loss": "dice"}),
    "lovasz": Variant("Lovasz", {"train.loss": "lovasz"}),
    # Table 12: the fusion token's order (max / mean are scores of every run)
    "oct_first": Variant("fusion token, OCT first", {"model.fusion_order": ["oct", "fundus"]}),
    # Table 14: the token initialisation
    "token_normal": Variant("normal", {"model.token_init": "normal"}),
    "token_kaiming": Variant("Kaiming", {"model.token_init": "kaiming"}),
}

# A column: (header, metric name as in the evaluation's replicates). A row: (title, variant, paper's numbers per
# column; optionally another variant for some columns: Table 6's single-modal models).
LOCALISATION_DETECTION = (("fundus AUC", "fundus.pixel_auroc"), ("fundus PRO", "fundus.aupro"),
                          ("OCT AUC", "oct.pixel_auroc"), ("OCT PRO", "oct.aupro"),
                          ("detection AUC", "detection.fusion"))


@dataclass(frozen=True)
class Row:
    title: str
    variant: str
    paper: tuple[float | None, ...]
    metrics: dict = field(default_factory=dict)  # column header -> metric name, where it differs from the table's
    variants: dict = field(default_factory=dict)  # column header -> variant, where it differs from the row's


@dataclass(frozen=True)
class Table:
    caption: str
    rows: tuple[Row, ...]
    reference: str  # the row title the p-values compare against (the paper's proposed setting)
    columns: tuple[tuple[str, str], ...] = LOCALISATION_DETECTION


PROPOSED = "default"
# The paper's proposed MMRAD (Table 2's row), the reference row of every table
PAPER_PROPOSED = (0.6997, 0.4303, 0.8295, 0.5339, 0.7664)
TABLES = {
    "4": Table("Table 4: the anomaly transform of the training-time simulation", (
        Row("Colour jitter", "color_jitter", (None,) * 5),  # in the text, not in the paper's table
        Row("Channel shuffle", "channel_shuffle", (0.6736, 0.3688, 0.6314, 0.4364, 0.6518)),
        Row("RGBShift", "rgb_shift", (0.6839, 0.4251, 0.8594, 0.5607, 0.6708)),
        Row("Rotate", "rotate", (0.7037, 0.4504, 0.8262, 0.5232, 0.5679)),
        Row("Composition (proposed)", PROPOSED, PAPER_PROPOSED),
    ), "Composition (proposed)"),
    "6": Table("Table 6: single-modal vs multi-modal training (localisation)", (
        Row("Single-modal training", "train_fundus", (0.6873, 0.4384, 0.8095, 0.5156),
            variants={"OCT AUC": "train_oct", "OCT PRO": "train_oct"}),
        Row("Multi-modal training (proposed)", PROPOSED, PAPER_PROPOSED[:4]),
    ), "Multi-modal training (proposed)", LOCALISATION_DETECTION[:4]),
    "7": Table("Table 7: low-level feature extraction and prompt-generator sharing", (
        Row("Without pre-training (random CNN)", PROPOSED, (0.6628, 0.3037, 0.7647, 0.4333, 0.7257)),
        Row("Fourier transform (EVP's)", "evp", (0.7197, 0.3554, 0.8241, 0.5068, 0.7524)),
        Row("Pretrained CNN (proposed)", "pretrained_cnn", PAPER_PROPOSED),
        Row("Without shared weights", "share_none", (0.6464, 0.3386, 0.8154, 0.4573, 0.7089)),
        Row("Shared LN_1..LN_n only", "share_ln_i", (0.6782, 0.3972, 0.8405, 0.4880, 0.7407)),
        Row("Shared LN_s and LN_1..LN_n", "share_all", (0.6253, 0.2932, 0.7706, 0.3674, 0.6693)),
        Row("Shared LN_s only (proposed)", PROPOSED, PAPER_PROPOSED),
    ), "Shared LN_s only (proposed)"),
    "8": Table("Table 8: the prompt-tuning method", (
        Row("Only decoder", "decoder_only", (0.6206, 0.2261, 0.7713, 0.3008, 0.6872)),
        Row("VPT", "vpt", (0.6305, 0.3996, 0.7895, 0.4109, 0.7166)),
        Row("AdaptFormer", "adaptformer", (0.6472, 0.3176, 0.8142, 0.4616, 0.7225)),
        Row("EVP", "evp", (0.6979, 0.4502, 0.8144, 0.4671, 0.7758)),
        Row("LPT (proposed)", PROPOSED, PAPER_PROPOSED),
    ), "LPT (proposed)"),
    "9": Table("Table 9: weight sharing of the decoder and the mask token", (
        Row("Shared decoder only", "separate_mask_token", (0.6846, 0.3842, 0.8188, 0.4827, 0.7624)),
        Row("Shared mask token only", "separate_decoder", (0.6609, 0.3088, 0.7573, 0.4584, 0.7237)),
        Row("Shared mask token and decoder (proposed)", PROPOSED, PAPER_PROPOSED),
    ), "Shared mask token and decoder (proposed)"),
    "10": Table("Table 10: the training loss", (
        Row("Focal", "focal", (0.7210, 0.3477, 0.8491, 0.5936, 0.7773)),
        Row("Dice", "dice", (0.6928, 0.3882, 0.8356, 0.5187, 0.7137)),
        Row("Lovasz", "lovasz", (0.6451, 0.3836, 0.7677, 0.3029, 0.7086)),
        Row("Cross-entropy (proposed)", PROPOSED, PAPER_PROPOSED),
    ), "Cross-entropy (proposed)"),
    "12": Table("Table 12: the fusion strategy (multi-modal detection AUC)", (
        Row("Maximum", PROPOSED, (0.7338,), metrics={"detection AUC": "detection.max"}),
        Row("Mean", PROPOSED, (0.4597,), metrics={"detection AUC": "detection.mean"}),
        Row("Fusion token (T_oct - T_c)", "oct_first", (0.7456,)),
        Row("Fusion token (T_c - T_oct) (proposed)", PROPOSED, (0.7664,)),
    ), "Fusion token (T_c - T_oct) (proposed)", LOCALISATION_DETECTION[4:]),
    "14": Table("Table 14: the token initialisation", (
        Row("Normal", "token_normal", (0.6844, 0.4280, 0.8229, 0.5326, 0.7493)),
        Row("Kaiming", "token_kaiming", (0.7097, 0.4274, 0.8302, 0.5258, 0.7459)),
        Row("Pretrained (proposed)", PROPOSED, PAPER_PROPOSED),
    ), "Pretrained (proposed)"),
}


# The metrics the tables read: the only replicates a run keeps (a few KB a run, so a grid's runs can be committed)
TABLE_METRICS = sorted({m for t in TABLES.values() for m in [c[1] for c in t.columns]
                        + [v for row in t.rows for v in row.metrics.values()]})


def table_variants(table: Table) -> list[str]:
    """The variants a table needs, in row order, each once."""
    names = [name for row in table.rows for name in (row.variant, *row.variants.values())]
    return list(dict.fromkeys(names))


def check_tables(names: list[str]) -> list[str]:
    """The table ids asked for (all when none), or a one-line error naming the unknown ones."""
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise DataError("mmrad ablate", f"unknown table(s) {unknown}", f"known: {list(TABLES)}")
    return names or list(TABLES)


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        tree = tree[key]
    tree[last] = value


def run_params(params: Params, variant: str, seed: int) -> Params:
    """params.yaml with the profile's and the variant's changes and the run's seed (validated as params.yaml is)."""
    raw = params.model_dump(mode="json")
    for key, value in {**PROFILES[params.ablation.profile](params), **VARIANTS[variant].changes}.items():
        _set(raw, key, value)
    raw["seed"] = seed
    return Params.model_validate(raw)


def runnable(params: Params, variant: str) -> bool:
    """A variant that needs pretrained CNN weights runs only when weights.resnets configures them."""
    return not VARIANTS[variant].needs_weights or any(w is not None for w in params.weights.resnets)


# --------------------------------------------------------------------------- running

RUN_METRICS = "metrics.json"


def _finished(run_dir: Path, fingerprint: str) -> dict | None:
    try:
        record = json.loads((run_dir / RUN_METRICS).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == fingerprint else None


def run_one(params: Params, variant: str, seed: int, prepared: Path, out: Path) -> dict:
    """Train and evaluate one variant at one seed (or find it done). Returns its run record."""
    p = run_params(params, variant, seed)
    fingerprint = training_fingerprint(p)
    run_dir = out / "runs" / variant / f"seed-{seed}"
    done = _finished(run_dir, fingerprint)
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    checkpoints = out / "checkpoints" / variant / f"seed-{seed}"
    model_dir = out / "models" / variant / f"seed-{seed}"
    resume = (checkpoints / CHECKPOINT).is_file() and \
        read_checkpoint(checkpoints / CHECKPOINT, "cpu")["params_hash"] == fingerprint  # else start over
    trained = _finished(model_dir, fingerprint) if (model_dir / MODEL_FILE).is_file() else None
    if trained is None:
        log.info("ablation %s seed %d: training %d steps%s", variant, seed, p.train.steps,
                 " (resuming)" if resume else "")
        metrics = train(p, prepared, model_dir, checkpoints, resume=resume, progress=False)
        metrics["fingerprint"] = fingerprint
        atomic_write_text(model_dir / RUN_METRICS, json.dumps(metrics, indent=2) + "\n")
    trained_at = time.perf_counter()
    test, predictions = score_mmrad(p, prepared, model_dir / MODEL_FILE)
    # The evaluation's case resamples come from params.yaml's seed for every run: paired across variants and seeds
    result, _, replicates = evaluate_predictions(test, predictions, p.evaluation, params.seed)
    record = {"variant": variant, "seed": seed, "fingerprint": fingerprint, "steps": p.train.steps,
              "profile": params.ablation.profile, "changes": VARIANTS[variant].changes,
              "seconds": round(time.perf_counter() - started, 1),
              "evaluation_seconds": round(time.perf_counter() - trained_at, 1),
              "metrics": {"localisation": result["localisation"], "detection": result["detection"],
                          "ci95": result.get("ci95", {})}}
    with atomic_dir(run_dir, [prepared]) as tmp:
        if replicates:
            kept = {k: v for k, v in replicates.items() if k in TABLE_METRICS}
            write_replicates(tmp / REPLICATES, kept, test.case_ids, params.seed)
        (tmp / RUN_METRICS).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(checkpoints, ignore_errors=True)  # train's own folder, done with (the model stays)
    return {**record, "skipped": False}


def cache_side(prepared: Path) -> int:
    """The side of the prepared cache's images (from its first one)."""
    manifest = prepared / "manifest.parquet"
    try:
        first = pq.read_table(manifest, columns=["cache_image"]).column(0)[0].as_py()
        with Image.open(prepared / first) as image:
            return image.size[0]
    except (OSError, IndexError, KeyError) as exc:
        raise DataError(manifest, "not a prepared dataset (run `mmrad prepare mmr` first)", str(exc)) from exc


def run_grid(params: Params, tables: list[str], prepared: str | Path, out: str | Path,
             seeds: list[int] | None = None, tracker=None) -> list[dict]:
    """Every (variant, seed) the tables need, each once, finished runs skipped. ``tracker(record)`` is called
    for each finished run (``track_run``: MLflow, at most once per run)."""
    prepared = Path(prepared)
    seeds = seeds or params.ablation.seeds
    variants = list(dict.fromkeys(v for t in check_tables(tables) for v in table_variants(TABLES[t])))
    todo = [(v, s) for v in variants if runnable(params, v) for s in seeds]
    skipped = [v for v in variants if not runnable(params, v)]
    if skipped:
        log.warning("ablation: %s need pretrained CNN weights (weights.resnets) and are left out", skipped)
    for v in variants:
        run_params(params, v, seeds[0])  # every variant's params valid before hours of work
    side, needed = cache_side(prepared), run_params(params, PROPOSED, seeds[0]).model.image_size
    if side != needed:
        raise DataError(prepared, f"the prepared cache is {side} px but the profile's model reads {needed} px",
                        f"prepare MMR with prepare.resolution {needed} and pass it with --prepared")
    out = claim_folder(out, [prepared])
    records = []
    started = time.perf_counter()
    for i, (variant, seed) in enumerate(todo, 1):
        record = run_one(params, variant, seed, prepared, out)
        records.append(record)
        if tracker is not None:
            tracker(record)
        log.info("ablation %d/%d: %s seed %d %s (%.0f s so far)", i, len(todo), variant, seed,
                 "already done" if record["skipped"] else f"done in {record['seconds']:.0f} s",
                 time.perf_counter() - started)
    return records


def track_run(params: Params, record: dict, project: str | Path = ".") -> str:
    """Log one finished run to MLflow (experiment ``<tracking.experiment>-ablations``), once: a run already
    logged with the same fingerprint is found by its tags and not logged again. Returns the run id."""
    use_tracking(project)
    experiment = ensure_experiment(f"{params.tracking.experiment}-ablations", project)
    key = f"{record['variant']}/seed-{record['seed']}/{record['fingerprint']}"
    found = mlflow.search_runs([experiment], filter_string=f"tags.`mmrad.ablation.run` = '{key}'",
                               output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(experiment_id=experiment, run_name=f"{record['variant']} seed {record['seed']}") as run:
        mlflow.set_tags({"mmrad.ablation.run": key, "mmrad.ablation.variant": record["variant"],
                         "mmrad.ablation.profile": record["profile"]})
        mlflow.log_params({"variant": record["variant"], "seed": record["seed"], "steps": record["steps"],
                           **{f"change.{k}": json.dumps(v) for k, v in record["changes"].items()}})
        values = flatten({k: record["metrics"][k] for k in ("localisation", "detection")})
        mlflow.log_metrics({k.removeprefix("localisation."): float(v) for k, v in values.items()})
        return run.info.run_id


# --------------------------------------------------------------------------- the report

def _replicates(run_dir: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(run_dir / REPLICATES)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _flat(record: dict) -> dict[str, float]:
    m = record["metrics"]
    values = {f"{mod}.{k}": v for mod, d in m["localisation"].items() for k, v in d.items()}
    values.update({f"detection.{k}": v for k, v in m["detection"].items()})
    return values


def _cell(runs: list[dict], dirs: list[Path], metric: str, seed: int) -> tuple[float, np.ndarray] | None:
    points = [_flat(r).get(metric) for r in runs]
    if not runs or any(v is None for v in points):
        return None
    reps = np.stack([_replicates(d)[metric] for d in dirs])
    return uncertainty.seed_mean(points, reps, seed)


def render(params: Params, tables: list[str], out: str | Path, seeds: list[int] | None = None,
           figures: Path | None = None, link_from: Path | None = None) -> str:
    """reports/ablations.md from the finished runs under ``out`` (those of the current params only): the paper's
    tables, ours beside theirs; with ``figures``, one PNG per table there too (linked relative to ``link_from``)."""
    out = Path(out)
    seeds = seeds or params.ablation.seeds
    tables = check_tables(tables)
    runs: dict[tuple[str, int], tuple[dict, Path]] = {}  # the finished runs of the current params
    needed = [(v, s) for t in tables for v in table_variants(TABLES[t]) if runnable(params, v) for s in seeds]
    for variant, seed in dict.fromkeys(needed):
        run_dir = out / "runs" / variant / f"seed-{seed}"
        record = _finished(run_dir, training_fingerprint(run_params(params, variant, seed)))
        if record is not None:
            runs[variant, seed] = (record, run_dir)
    minutes = sum(r["seconds"] for r, _ in runs.values()) / 60
    lines = ["# Ablations (the paper's Section 5)", "",
             f"Profile `{params.ablation.profile}` ({json.dumps(PROFILES[params.ablation.profile](params))} over "
             f"params.yaml), seeds {seeds}, on the default MMR test set; {len(runs)} of "
             f"{len(dict.fromkeys(needed))} runs finished, their wall times summing to {minutes:.0f} min. Ours: the "
             "mean over the seeds with its 95 % interval (case and seed bootstrap: `uncertainty.seed_mean`), and "
             "p, the paired case bootstrap of the row against the table's proposed row (same resamples), two-sided. "
             "Paper: the published number (real MMR, pretrained SAM). Produced by `mmrad ablate`; "
             "docs/decisions.md (\"Ablations\") says how each variant reads the paper.", ""]
    for tid in tables:
        table = TABLES[tid]
        lines += [f"## {table.caption}", "",
                  "| setting | " + " | ".join(f"{h} ours | {h} paper" for h, _ in table.columns) + " |",
                  "|---|" + "---:|---:|" * len(table.columns)]
        cells: dict[tuple[str, str], tuple[float, np.ndarray] | None] = {}
        for row in table.rows:
            for header, metric in table.columns:
                variant = row.variants.get(header, row.variant)
                found = [runs[variant, s] for s in seeds if (variant, s) in runs]
                cells[row.title, header] = _cell([r for r, _ in found], [d for _, d in found],
                                                 row.metrics.get(header, metric), params.seed) \
                    if len(found) == len(seeds) else None
        for row in table.rows:
            parts = []
            for (header, _), paper in zip(table.columns, row.paper):
                mine, ref = cells[row.title, header], cells[table.reference, header]
                text = ("needs weights" if not all(runnable(params, v) for v in (row.variant, *row.variants.values()))
                        else "not run") if mine is None else _interval(*mine)
                reference = next(r for r in table.rows if r.title == table.reference)
                same = (row.variants.get(header, row.variant), row.metrics.get(header)) == \
                    (reference.variants.get(header, reference.variant), reference.metrics.get(header))
                if mine is not None and ref is not None and row.title != table.reference:
                    text += " (= proposed)" if same else \
                        f", p {_p(uncertainty.paired_bootstrap_p(mine[1], ref[1], mine[0] - ref[0]), len(mine[1]))}"
                parts += [text, "-" if paper is None else f"{paper:.4f}"]
            lines.append(f"| {row.title} | " + " | ".join(parts) + " |")
        lines += ["", _ordering(table, cells), ""]
        if figures is not None and any(v is not None for v in cells.values()):
            png = figures / f"table-{tid}.png"
            table_figure(table, cells, png)
            lines += [f"![{table.caption}]({os.path.relpath(png, link_from or Path.cwd())})", ""]
    return "\n".join(lines)


def table_figure(table: Table, cells: dict, path: Path) -> None:
    """One panel per column: each row's mean over seeds with its 95 % interval (ours, black) and the paper's
    number (an orange cross), so the ordering of the rows is seen at a glance."""
    titles = [row.title for row in table.rows]
    wide = len(table.columns) > 1
    fig = Figure(figsize=(2.6 * len(table.columns) + 2.4 if wide else 6.5, 0.45 * len(titles) + (1.4 if wide else 1.8)),
                 layout="constrained")
    axes = fig.subplots(1, len(table.columns), sharey=True, squeeze=False)[0]
    for k, (ax, (header, _)) in enumerate(zip(axes, table.columns)):
        for y, row in enumerate(table.rows):
            mine = cells[row.title, header]
            if mine is not None:
                low, high = uncertainty.percentile_interval(mine[1])
                ax.plot([low, high], [y, y], color="black", linewidth=1.5)
                ax.plot(mine[0], y, "o", color="black", markersize=5)
            if row.paper[k] is not None:
                ax.plot(row.paper[k], y, "x", color="tab:orange", markersize=7, markeredgewidth=2)
        ax.set_title(header, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(range(len(titles)), titles)
    axes[0].invert_yaxis()  # the rows top-down, as in the table (the panels share the axis)
    axes[0].plot([], [], "o-", color="black", label="ours: mean over seeds, 95 % CI (cases and seeds)")
    axes[0].plot([], [], "x", color="tab:orange", markeredgewidth=2, label="paper (real MMR, pretrained SAM)")
    fig.legend(loc="outside lower center", ncols=2 if wide else 1, fontsize=9, frameon=False)
    fig.suptitle(table.caption, fontsize=11)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _p(value: float, replicates: int) -> str:
    """A paired-bootstrap p-value; at its floor 2 / (B + 1) (no replicate on the other side of zero) as a bound."""
    text = uncertainty.format_p(value, uncertainty.bootstrap_p_floor(replicates))
    return text if text.startswith("<") else f"= {text}"


def _interval(point: float, replicates: np.ndarray) -> str:
    low, high = uncertainty.percentile_interval(replicates)
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def _ordering(table: Table, cells: dict) -> str:
    """Which row the paper ranks first per column, and whether ours does too."""
    notes = []
    for k, (header, _) in enumerate(table.columns):
        papers = [(row.paper[k], row.title) for row in table.rows if row.paper[k] is not None]
        ours = [(cells[row.title, header][0], row.title) for row in table.rows if cells[row.title, header]]
        if not papers or len(ours) < 2:
            continue
        best_paper = max(papers)[1]
        best_ours = max(ours, key=lambda vt: (vt[0], vt[1] == table.reference))[1]  # a tie: the proposed row
        notes.append(f"{header}: paper's best {best_paper}; ours {best_ours}"
                     + (" (same)" if best_paper == best_ours else ""))
    return "Best row per column: " + "; ".join(notes) + "." if notes else "Too few finished runs to rank rows."


def write_report(params: Params, tables: list[str], out: str | Path, report: str | Path) -> Path:
    """The report (and its figures under ``out/figures/``, the grid's own folder)."""
    report, out = Path(report), Path(out)
    figures = claim_folder(out) / "figures"
    figures.mkdir(exist_ok=True)
    atomic_write_text(report, render(params, tables, out, figures=figures, link_from=report.parent) + "\n")
    return report
