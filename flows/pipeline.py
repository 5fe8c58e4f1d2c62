"""The Prefect flows of the pipeline.

* ``stage``: one ``mmrad`` subcommand as a flow run named after its DVC stage
  (``train``, ``transfer@mmr_to_idrid``: DVC sets ``DVC_STAGE``; the command
  when run by hand) and tagged with the project and its git commit; what
  dvc.yaml runs for each stage. The
  preprocessing, training, evaluation, transfer, report and register stages
  are all this flow with their arguments, so the flows and the CLI cannot
  drift apart: both parse with ``mmrad.cli.build_parser`` and call the same
  library functions.
* ``retrain``: the scheduled loop: bring the pipeline up to date with
  ``dvc repro`` (which runs each stage as a ``stage`` flow run and registers
  the new model as ``challenger``), then ``mmrad registry promote`` through the
  gate. Deployed on a cron schedule by prefect.yaml. The stages' flow runs
  are children of its ``dvc-repro`` task run: one parent run per repro.

Artifacts attached to flow runs: the markdown report (``report``), a table
of the evaluation metrics (``evaluate``), the training summary (``train``),
the registered version (``register``) and the gate's comparison (``retrain``).
The MLflow run of ``register`` carries the ids and address of its flow run
(tags ``prefect.*``, through ``MMRAD_RUN_TAGS``), and its artifact names the
MLflow run: each side links to the other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, tags, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.futures import wait
from prefect.runtime import flow_run, task_run
from prefect.settings import temporary_settings
from prefect.states import Pending

from flows.server import PROJECT_SERVER_ENV
from mmrad.cli import build_parser
from mmrad.cli import main as mmrad_main
from mmrad.core.errors import DataError
from mmrad.core.params import load_params
from mmrad.core.provenance import RUN_TAGS_ENV, code_state

# The retrain flow's dvc-repro task run: the stages that `dvc repro` starts become its children (one parent per repro).
PARENT_ENV = "MMRAD_PREFECT_PARENT_TASK_RUN"


class StageFailed(RuntimeError):
    def __init__(self, argv: list[str], status: int):
        super().__init__(f"mmrad {' '.join(argv)} exited with status {status} (the error is in the log above)")
        self.argv, self.status = list(argv), status

    def __reduce__(self):  # crosses Prefect's result store and Dask workers intact
        return type(self), (self.argv, self.status)


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry a transient failure only: bad input (a DataError, exit status 2) fails the same way every time,
    and an unreachable tracking server (a DataError too) has already waited its timeout (mmrad.ops.tracking)."""
    return not isinstance(state.result(raise_on_failure=False), DataError)


@task(name="run-stage")
def run_stage(argv: list[str]) -> int:
    """The stage itself: the mmrad command, in this process (its logs reach the flow run).

    Bad input raises its DataError: the task and flow runs end Failed with the one line as their message."""
    status = mmrad_main(argv, raise_errors=True)
    if status:
        raise StageFailed(argv, status)
    return status


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


@task(name="attach-artifacts", retries=2, retry_delay_seconds=5)
def attach_artifacts(args) -> None:
    """What a person wants to see of this stage in the Prefect UI (report, metrics table, registered version)."""
    command = args.command
    if command == "report" and Path(args.out).is_file():
        create_markdown_artifact(Path(args.out).read_text(), key="mmrad-report", description="The evaluation report")
    elif command == "evaluate":
        out = Path(args.out or f"reports/{args.method}")
        result = json.loads((out / "metrics.json").read_text())
        rows = [{"metric": f"{m}.{k}", "value": v} for m, values in result.get("localisation", {}).items()
                for k, v in values.items()]
        rows += [{"metric": f"detection.{k}", "value": v} for k, v in result.get("detection", {}).items()]
        create_table_artifact(rows, key=_slug(f"metrics-{out}"), description=f"{args.method} on {result['dataset']}")
    elif command == "train":
        summary = json.loads((Path(args.out) / "metrics.json").read_text())
        create_table_artifact([{"key": k, "value": str(v)} for k, v in summary.items()],
                              key=_slug(f"training-{args.out}"), description="Training summary")
    elif command == "register":
        record = json.loads(Path(args.out).read_text())
        create_markdown_artifact(f"Registered **{record['model_name']}** version **{record['version']}** as "
                                 f"`challenger` (run `{record['run_id']}`, tracking `{record['tracking_uri']}`).",
                                 key="mmrad-registered")


TASKS_PER_WORKER = 4  # chunks per Dask worker: balanced, and few enough that a task run's bookkeeping (~0.2 s) is small


@task(name="prepare-images", cache_policy=NO_CACHE, retries=1, retry_condition_fn=_retry_unless_bad_input)
def prepare_images(fn, items: list) -> list[dict]:
    """A chunk of the prepare stage's per-image work (decode, validate, resize, cache), on a Dask worker."""
    from distributed import get_worker  # noqa: PLC0415 (Dask: only the prepare flow needs it, seconds to import)

    get_run_logger().info("%d images on Dask worker %s", len(items), get_worker().address)
    return [fn(item) for item in items]


def dask_mapping(workers: int):
    """prepare's mapper: Prefect task mapping over chunks, run by the flow's Dask task runner, results in order."""
    def run(fn, items: list):
        size = max(1, math.ceil(len(items) / (workers * TASKS_PER_WORKER)))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        futures = prepare_images.map(unmapped(fn), chunks)
        try:
            for future in futures:
                yield from future.result()
        except BaseException:
            # the other chunks must stop writing before the caller removes the temporary output: a running
            # Dask task cannot be stopped, so every chunk is let finish (a few per worker, TASKS_PER_WORKER)
            wait(futures)
            raise
    return run


def _api_url() -> str:
    """This flow run's Prefect API (the team server, or the temporary one this process started)."""
    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


LOCAL_DASK = "local"  # prepare.dask_address / MMRAD_DASK_ADDRESS: a local Dask cluster of prepare.workers processes


def dask_address(params) -> str | None:
    """Where prepare's per-image work goes under Prefect: a Dask scheduler, ``local``, or None.

    None (the default) is the library's process pool, inside the stage's flow run: on one machine it is
    faster than a local Dask cluster, whose per-task orchestration costs more than decoding an image
    (docs/benchmarks.md). A cluster pays off when its workers are other machines.
    """
    return os.environ.get("MMRAD_DASK_ADDRESS") or params.prepare.dask_address or None


def dask_runner(address: str, workers: int):
    """A local Dask cluster of ``workers`` processes (``local``), or the scheduler at ``address``."""
    from prefect_dask import DaskTaskRunner  # noqa: PLC0415 (Dask: only the prepare flow needs it, seconds to import)

    # Dask's worker processes report their task runs to this flow's API (not to temporary servers of their own)
    os.environ["PREFECT_API_URL"] = _api_url()
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the cluster's start/stop chatter
    if address != LOCAL_DASK:
        return DaskTaskRunner(address=address)
    # workers import the stage's code as they start (with the cluster), not inside the first mapped task
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None,
                                          "preload": ["flows.dask_preload"]})


@flow(name="prepare-on-dask", flow_run_name="prepare-images")
def prepare_on_dask(argv: list[str], workers: int) -> int:
    """The prepare stage with its per-image work mapped over Dask workers (the same library code)."""
    from mmrad.data.prepare import mapping_with  # noqa: PLC0415 (pandas, pyarrow, scikit-image: only prepare needs them)

    with mapping_with(dask_mapping(workers)):
        status = mmrad_main(argv, raise_errors=True)
    if status:
        raise StageFailed(argv, status)
    return status


@flow(name="stage", flow_run_name="{name}", log_prints=True)
def stage(name: str, argv: list[str]) -> int:
    """One pipeline stage called ``name``: ``argv`` are the arguments of ``mmrad`` (without the program name)."""
    args = build_parser().parse_args(argv)
    get_run_logger().info("mmrad %s", " ".join(argv))
    # the MLflow run that register opens names this flow run (and the repro's parent run): one click either way
    links = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": flow_run.name,
             "prefect.flow_run_url": flow_run.ui_url or ""}
    if flow_run.parent_flow_run_id:
        links["prefect.parent_flow_run_id"] = str(flow_run.parent_flow_run_id)
    os.environ[RUN_TAGS_ENV] = json.dumps(links)
    # register talks to the tracking server: retry a transient failure (a failed attempt's run stays FAILED)
    params = load_params(args.params) if args.command == "prepare" else None
    if params is not None and (address := dask_address(params)):
        prepare_on_dask.with_options(task_runner=dask_runner(address, params.prepare.workers))(
            argv, params.prepare.workers)
    else:
        runner = run_stage.with_options(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_unless_bad_input
                                        ) if args.command == "register" else run_stage
        runner(argv)
    attach_artifacts(args)
    return 0


@task(name="dvc-repro")
def dvc_repro(project: str) -> int:
    """Bring everything up to date; each stage runs as its own ``stage`` flow run.

    With a DVC remote configured, ``dvc repro --pull`` first fetches outputs
    others already pushed (a fresh worker need not recompute them) and
    ``dvc push`` afterwards shares this run's.

    The stages report to this flow's API (the team server, or the temporary
    local one this run started), so they start no server of their own.
    """
    env = {**os.environ, "PREFECT_API_URL": _api_url(), PARENT_ENV: str(task_run.id)}
    dvc = [sys.executable, "-m", "dvc"]
    # with a DVC remote (the team's object store): start from what others pushed, share what this run made
    remote = subprocess.run([*dvc, "remote", "list"], cwd=project, capture_output=True, text=True).stdout.strip()
    # dvc's output streams through (progress stays visible); each stage's log is also in its own flow run
    done = subprocess.run([*dvc, "repro", *(["--pull"] if remote else [])], cwd=project, env=env)
    if done.returncode:
        raise RuntimeError(f"dvc repro failed with status {done.returncode} (its output is above; the failed "
                           "stage's flow run has the details)")
    if remote:
        pushed = subprocess.run([*dvc, "push"], cwd=project, env=env)
        if pushed.returncode:
            raise RuntimeError(f"dvc push to the remote failed with status {pushed.returncode} (output above)")
    return done.returncode


@task(name="promote", retries=2, retry_delay_seconds=10)
def promote_challenger(params_file: str, dry_run: bool):
    from mmrad.ops import registry  # noqa: PLC0415 (MLflow: only the retrain flow needs it, seconds to import)

    decision = registry.promote(load_params(params_file), dry_run=dry_run)
    create_markdown_artifact(f"```\n{decision.table()}\n```", key="mmrad-promotion",
                             description="Challenger vs champion on the gated metrics")
    get_run_logger().info("\n%s", decision.table())
    return {"promoted": decision.promoted, "passed": decision.passed, "reason": decision.reason,
            "challenger": decision.challenger, "champion": decision.champion}


@flow(name="retrain", log_prints=True)
def retrain(project: str = ".", params_file: str = "params.yaml", promote: bool = True) -> dict:
    """The scheduled loop: ``dvc repro`` (train, evaluate, transfer, register), then the promotion gate."""
    project = str(Path(project).resolve())
    dvc_repro(project)
    os.chdir(project)  # the registry's embedded store lives in the project
    return promote_challenger(params_file, dry_run=not promote)


def stage_name(args) -> str:
    """The flow run's name: the DVC stage running it (DVC sets DVC_STAGE: ``prepare@mmr``), else the command."""
    return os.environ.get("DVC_STAGE") or " ".join(
        [args.command] + [getattr(args, k) for k in ("dataset", "method", "action")
                          if isinstance(getattr(args, k, None), str)])


def run_tags(project: str | Path) -> list[str]:
    """Tags of a stage's flow run: ``mmrad``, the project (its folder) and the git commit (``+dirty`` if edited)."""
    project = Path(project).resolve()
    commit, dirty = code_state(project)
    found = ["mmrad", f"project:{project.name}"]
    if commit:
        found.append(f"commit:{commit[:12]}{'+dirty' if dirty else ''}")
    return found


def engine_settings() -> dict:
    """Prefect settings for a stage's flow run: Prefect's own, except against the project server.

    There the flow run sends no heartbeats: only a server's services read them (to mark a crashed run) and the
    project server runs none (flows/server.py), and ending the heartbeat thread costs each stage up to 1 s.
    """
    url = os.environ.get(PROJECT_SERVER_ENV)
    return {"flows.heartbeat_frequency": None} if url and url == os.environ.get("PREFECT_API_URL") else {}


def run_stage_flow(name: str, argv: list[str]):
    """The ``stage`` flow as a run called ``name``, tagged; a child of the retrain flow's repro when it started us."""
    with temporary_settings(updates=engine_settings()):
        return _run_stage_flow(name, argv)


def _run_stage_flow(name: str, argv: list[str]):
    parameters, labels = {"name": name, "argv": argv}, run_tags(os.environ.get("DVC_ROOT", "."))
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        with tags(*labels):
            return stage(name, argv, return_state=True)
    # another process's task run as the parent: create the run under it, then run it (what a subflow does)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(stage, name=name, parameters=stage.serialize_parameters(parameters),
                                     parent_task_run_id=UUID(parent), state=Pending(), tags=labels)
    return run_flow(stage, flow_run=run, parameters=parameters, return_type="state")


def main(argv: list[str] | None = None) -> int:
    """``python -m flows <mmrad stage args>``: run the stage as a flow (MMRAD_ORCHESTRATION=off: plainly)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MMRAD_ORCHESTRATION", "on").lower() in ("off", "0", "false", "no"):
        return mmrad_main(argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    args = build_parser().parse_args(argv)  # bad arguments: argparse's message and status 2, before any flow
    state = run_stage_flow(stage_name(args), argv)
    if state.is_completed():
        return 0
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, DataError):  # the same line and status as `mmrad`, after Prefect's own log of the run
        print(f"mmrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return exc.status if isinstance(exc, StageFailed) else 1
