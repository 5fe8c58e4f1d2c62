"""The ``mmrad`` command: one subcommand per pipeline stage.

dvc.yaml and the Prefect flows call the same library functions these
subcommands call; the CLI only parses arguments, sets up logging and turns a
``DataError`` into a one-line message and exit status 2.

Each ``_cmd_*`` imports the library module it runs when it runs, not at the
top: the stages pull in torch, MLflow or albumentations (seconds each), and
``mmrad --help`` or a bad argument must answer at once. These are the
package's only function-level imports of its own modules.
(tests/system/test_dvc_deps.py reads them to find each stage's code.)
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from mmrad.core.errors import DataError
from mmrad.core.outputs import check_output_folder
from mmrad.core.params import check_batch_size, load_params
from mmrad.core.processes import exit_on_sigterm
from mmrad.evaluation.methods import BASELINES, METHODS

log = logging.getLogger("mmrad")

DESCRIPTION = """\
MMRAD pipeline stages (run them all with `dvc repro`):

  generate       render the synthetic default dataset in the real MMR / IDRiD / RESC layouts
  prepare        validate one dataset, write its split manifest (parquet) and resized cache
  train          fine-tune MMRAD on healthy pairs with simulated anomalies
  evaluate       metrics, curves and overlays of MMRAD or a baseline on the test split
  report         the markdown report: our tables beside the paper's
  register       log the run to MLflow (lineage, metrics, artifacts, model); register it as `challenger`
  registry       promote / rollback / list the registered model versions (the ML-ops loop)
  predict        score fundus / OCT image files with a trained or registered model: overlays + scores
  ablate         the paper's ablation tables as a resumable grid of runs (hours; not a dvc.yaml stage)
  contact-sheet  save a PNG grid of synthetic images with their lesion outlines

Every stage reads params.yaml (see the comments there). Bad input stops the
stage with one line naming the file and the broken rule, and leaves no
partial output behind.
"""


def _cmd_generate(args) -> None:
    from mmrad.synthetic.generate import generate

    started = time.perf_counter()
    counts = generate(load_params(args.params), args.out)
    log.info("generate: %s images/cases in %.1f s -> %s", counts, time.perf_counter() - started, args.out)


def _cmd_prepare(args) -> None:
    from mmrad.data.prepare import prepare_dataset

    params = load_params(args.params)
    names = list(params.datasets) if args.dataset == "all" else [args.dataset]
    if args.out and len(names) > 1:
        raise DataError("--out", "--out takes a single dataset, not 'all'")
    for name in names:
        if name not in params.datasets:
            raise DataError(args.params, f"dataset '{name}' is not configured under 'datasets'",
                            f"configured: {sorted(params.datasets)}")
        started = time.perf_counter()
        out = Path(args.out) if args.out else Path("data/prepared") / name
        prepare_dataset(name, params.datasets[name].root, out, params.prepare.resolution, params.prepare.workers,
                        max_pixels=params.prepare.max_image_pixels)
        log.info("prepare %s: done in %.1f s -> %s", name, time.perf_counter() - started, out)


def _healthy_training_cases(prepared: Path) -> int | None:
    """From the prepared summary.json (no heavy import): the healthy training cases, None if unknown."""
    try:
        count = json.loads((prepared / "summary.json").read_text())["splits"]["train"]["normal_cases"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # train() reports a missing or broken prepared folder itself
    return count if isinstance(count, int) else None


def _cmd_train(args) -> int | None:
    params = load_params(args.params)
    prepared = args.prepared or f"data/prepared/{params.train.dataset}"
    healthy = _healthy_training_cases(Path(prepared))
    if healthy is not None:  # before torch is imported (seconds)
        check_batch_size(params, healthy, Path(prepared) / "summary.json")

    from mmrad.training import distributed
    from mmrad.training.train import train

    if params.train.processes > 1 and not distributed.under_launcher():
        # N data-parallel processes: torchrun starts N copies of this very command
        command = distributed.launch_command(params.train.processes, args.argv)
        log.info("train: %d processes: %s", params.train.processes, " ".join(command))
        return subprocess.run(command).returncode
    train(params, prepared, args.out, args.checkpoints, resume=args.resume, stop_after=args.stop_after)


def _cmd_evaluate(args) -> None:
    from mmrad.evaluation.evaluate import run_evaluation

    params = load_params(args.params)
    prepared = args.prepared or f"data/prepared/{params.train.dataset}"
    model = args.model if METHODS[args.method].trained else None
    run_evaluation(params, args.method, prepared, args.out or f"reports/{args.method}", model_path=model)


def _cmd_report(args) -> None:
    from mmrad.evaluation.report import write_report

    write_report(load_params(args.params), args.reports, args.train_metrics, args.out)
    log.info("report -> %s", args.out)


def _cmd_register(args) -> None:
    from mmrad.ops.tracking import log_and_register

    record = log_and_register(load_params(args.params), model_dir=args.model_dir, reports=args.reports,
                              out=args.out, params_file=args.params)
    log.info("register: %s version %d (run %s) at %s", record["model_name"], record["version"],
             record["run_id"], record["tracking_uri"])


def _cmd_registry(args) -> int:
    from mmrad.ops import registry

    params = load_params(args.params)
    if args.action == "list":
        print(registry.list_versions(params))
        return 0
    if args.action == "rollback":
        old, new = registry.rollback(params)
        print(f"champion: version {old} -> version {new}")
        return 0
    decision = registry.promote(params, dry_run=args.dry_run, force=args.force, reason=args.reason)
    print(decision.table())
    if decision.promoted:
        print(f"champion -> version {decision.challenger}")
    elif args.dry_run:
        print("dry run: nothing changed")
    return 0 if decision.passed or decision.promoted else 1


def _cmd_predict(args) -> None:
    from mmrad.ops.predict import Case, find_cases, load_model, predict_files

    if args.folder and (args.fundus or args.oct):
        raise DataError("--folder", "give either --folder or --fundus / --oct, not both")
    if not (args.folder or args.fundus or args.oct):
        raise DataError("mmrad predict", "nothing to score", "give --fundus and/or --oct, or --folder")
    inputs = [p for p in (args.folder, args.fundus, args.oct) if p]
    if not str(args.model).startswith(("models:/", "runs:/")):
        inputs.append(args.model)
    check_output_folder(args.out, inputs)  # before anything is read
    if args.folder:
        cases = find_cases(args.folder)
    else:
        paths = {m: Path(p) for m, p in (("fundus", args.fundus), ("oct", args.oct)) if p}
        cases = [Case(args.case_id or next(iter(paths.values())).stem, paths)]
    started = time.perf_counter()
    model, params = load_model(args.model, args.params)
    records = predict_files(model, params, cases, args.out, batch_size=args.batch_size, overlays=not args.no_overlays,
                            inputs=inputs)
    for record in records[:20]:
        print(f"{record['case_id']}\t{record['modalities']}\tscore {record['score']:.4f}")
    if len(records) > 20:
        print(f"... {len(records) - 20} more in {args.out}/scores.json")
    log.info("predict: %d case(s) in %.1f s -> %s", len(records), time.perf_counter() - started, args.out)


def _cmd_ablate(args) -> None:
    from mmrad.ops import ablation

    params = load_params(args.params)
    tables = ablation.check_tables(args.tables)
    if not args.render_only:
        started = time.perf_counter()
        tracker = None if args.no_track else (lambda record: ablation.track_run(params, record))
        records = ablation.run_grid(params, tables, args.prepared, args.out, tracker=tracker)
        ran = [r for r in records if not r["skipped"]]
        log.info("ablate: %d runs (%d done before) in %.0f s", len(records), len(records) - len(ran),
                 time.perf_counter() - started)
    ablation.write_report(params, tables, args.out, args.report)
    log.info("ablate: report -> %s", args.report)


def _cmd_contact_sheet(args) -> None:
    from mmrad.synthetic.contact_sheet import contact_sheet

    contact_sheet(load_params(args.params), args.out)
    log.info("contact sheet -> %s", args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrad", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", description="Render synthetic fundus/OCT eyes with lesions and write them in the "
                                               "MMR, IDRiD and RESC layouts (params: seed, synthetic).")
    p.add_argument("--out", default="data/raw/synthetic", help="output folder (default: %(default)s)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("prepare", description="Scan a dataset in its real layout, validate every image and annotation, "
                                              "and write manifest.parquet, summary.json and a resized cache "
                                              "(params: datasets, prepare).")
    p.add_argument("dataset", help="mmr, idrid, resc, or all")
    p.add_argument("--out", help="output folder (default: data/prepared/<dataset>)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", description="Fine-tune MMRAD: frozen SAM encoder, low-level prompts and the shared decoder, "
                                            "trained on healthy pairs with simulated anomalies (params: seed, model, "
                                            "weights, simulation, train). Writes model.pt (trainable weights only), "
                                            "metrics.json and loss.tsv.")
    p.add_argument("--prepared", help="prepared dataset folder (default: data/prepared/<train.dataset>)")
    p.add_argument("--out", default="models/mmrad", help="output folder (default: %(default)s)")
    p.add_argument("--checkpoints", default="checkpoints/mmrad",
                   help="folder of the resumable checkpoint (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, exactly")
    p.add_argument("--stop-after", type=positive_int, metavar="N", help="stop after N more steps (a checkpoint stays)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", description="Pixel AUROC and AU-PRO per modality, detection AUROC of every case score, "
                                               "per-symptom results, ROC/PRO curves (CSV) and overlay PNGs. "
                                   f"Baselines ({', '.join(BASELINES)}) are fitted on the healthy "
                                   "training split first.")
    p.add_argument("method", choices=list(METHODS))
    p.add_argument("--model", default="models/mmrad/model.pt", help="MMRAD model file (default: %(default)s)")
    p.add_argument("--prepared", help="prepared dataset folder (default: data/prepared/<train.dataset>)")
    p.add_argument("--out", help="output folder (default: reports/<method>)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("report", description="Tables 2, 5, 12 and 13 of the paper, with our numbers beside the published ones.")
    p.add_argument("--reports", default="reports", help="folder of <method>/metrics.json (default: %(default)s)")
    p.add_argument("--train-metrics", default="models/mmrad/metrics.json")
    p.add_argument("--out", default="reports/report.md")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("register", description="Open an MLflow run with params, per-step training loss, every evaluation "
                                               "metric, artifacts (report, curves, overlays, dvc.lock) and lineage tags "
                                               "(git commit, DVC data hashes, params hash, weights); log the model as an "
                                               "MLflow pyfunc model and register it as a new version with alias 'challenger'. "
                                               "Tracks to MLFLOW_TRACKING_URI, else the embedded sqlite store mlflow.db.")
    p.add_argument("--model-dir", default="models/mmrad", help="trained model folder (default: %(default)s)")
    p.add_argument("--reports", default="reports", help="evaluation outputs (default: %(default)s)")
    p.add_argument("--out", default="models/registered.json", help="ids of the run and version (default: %(default)s)")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("registry", description="promote: move 'champion' to 'challenger' if the gate in params.yaml "
                                               "(tracking.gate) passes; exit status 1 when it fails. rollback: restore the "
                                               "champion's predecessor. list: versions, aliases and gated metrics.")
    p.add_argument("action", choices=["promote", "rollback", "list"])
    p.add_argument("--dry-run", action="store_true", help="promote: print the comparison, change nothing")
    p.add_argument("--force", action="store_true", help="promote: past a failed gate (needs --reason)")
    p.add_argument("--reason", help="promote --force: why, recorded on the version with who and when")
    p.set_defaults(func=_cmd_registry)

    p = sub.add_parser("predict", description="Score one case (--fundus and/or --oct) or a folder of cases "
                                              "(<case>_fundus.<ext> / <case>_oct.<ext>, or <case>/fundus.<ext> + "
                                              "<case>/oct.<ext>). Images are resized as the prepare stage does. Writes "
                                              "scores.json, scores.parquet and overlays/<case>.png under --out. The score is "
                                              "the fusion token's anomaly probability for a pair, the single-modal one else.")
    p.add_argument("--model", default="models/mmrad",
                   help="training output folder / model.pt (rebuilt with --params), or an MLflow model: "
                        "models:/NAME@ALIAS, runs:/ID/model (default: %(default)s)")
    p.add_argument("--fundus", help="fundus photograph of one case")
    p.add_argument("--oct", help="OCT B-scan of one case")
    p.add_argument("--case-id", help="name of that case in the outputs (default: the file's stem)")
    p.add_argument("--folder", help="folder of cases")
    p.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="cases per forward pass (default: %(default)s)")
    p.add_argument("--no-overlays", action="store_true", help="scores only, no PNGs")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("ablate", description="The paper's ablation tables (4 6 7 8 9 10 12 14; all by default): every "
                                             "variant trained and evaluated with each seed of ablation.seeds at the "
                                             "profile of ablation.profile, finished runs skipped (an interrupted grid "
                                             "resumes), each run tracked in MLflow (experiment <tracking.experiment>-"
                                             "ablations); then the report in the paper's shape.")
    p.add_argument("tables", nargs="*", metavar="TABLE", help="table numbers (default: all)")
    p.add_argument("--prepared", default="data/prepared/mmr", help="prepared MMR (default: %(default)s)")
    p.add_argument("--out", default="reports/ablations", help="the grid's runs (default: %(default)s)")
    p.add_argument("--report", default="reports/ablations.md", help="the tables (default: %(default)s)")
    p.add_argument("--no-track", action="store_true", help="do not log the runs to MLflow")
    p.add_argument("--render-only", action="store_true", help="write the report from the finished runs only")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("contact-sheet", description="Render a grid of synthetic fundus and OCT images, healthy and with "
                                                    "each lesion kind outlined, to show what the default data looks like.")
    p.add_argument("--out", default="docs/synthetic-data.png", help="PNG path (default: %(default)s)")
    p.set_defaults(func=_cmd_contact_sheet)
    return parser


def check_arguments(argv: list[str]) -> int | None:
    """The checks every stage makes before its heavy imports: arguments (argparse exits 2) and params.yaml.

    Returns 2 after printing the one-line error, None when all is well (``python -m flows`` calls this
    before importing Prefect; ``main`` through ``load_params``).
    """
    if not argv or argv[0] in ("-h", "--help"):
        return None
    args = build_parser().parse_args(argv)
    try:
        load_params(args.params)
    except DataError as exc:
        print(f"mmrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return None


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def main(argv: list[str] | None = None, raise_errors: bool = False) -> int:
    """Run one subcommand; a DataError becomes its one-line message and status 2 (``raise_errors``: raised,
    for the Prefect flows, whose runs then end Failed with that message)."""
    args = build_parser().parse_args(argv)
    exit_on_sigterm()  # a `kill` runs the clean-up of temporary outputs, as an error does
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    # explicit, for when the root logger was configured before us (a Prefect flow run)
    logging.getLogger("mmrad").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        status = args.func(args)
    except DataError as exc:
        if raise_errors:
            raise
        print(f"mmrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
