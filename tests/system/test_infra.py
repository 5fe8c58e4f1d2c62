"""Static checks of the team stack in infra/ (Docker and Kubernetes do not run on our machines).

compose.yaml, .env.example, postgres/init.sql, Dockerfile and k8s/gpu-job-template.json
are parsed and cross-checked with each other, with prefect.yaml and with infra/README.md.
The Kubernetes template goes through Prefect's own code: the server's work-pool schema,
its JSON-schema validation of job variables, and ``BaseJobConfiguration`` rendering.
Every check raises ``InfraError("<file>: <rule>: <detail>")``; each has a negative test
that gives it a broken copy. infra/README.md lists what these checks do not catch.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

WORKER = "prefect-worker"
POSTGRES = "postgres"
MINIO_INIT = "minio-init"
MLFLOW = "mlflow"
PREFECT_SERVER = "prefect-server"


class InfraError(AssertionError):
    """A broken rule: '<file>: <rule>: <detail>'."""


@dataclass(frozen=True)
class Stack:
    """The files the checks read, under one root (the repository, or a broken copy of it)."""

    root: Path

    @property
    def compose(self) -> Path:
        return self.root / "infra" / "compose.yaml"

    @property
    def env_example(self) -> Path:
        return self.root / "infra" / ".env.example"

    @property
    def init_sql(self) -> Path:
        return self.root / "infra" / "postgres" / "init.sql"

    @property
    def dockerfile(self) -> Path:
        return self.root / "infra" / "Dockerfile"

    @property
    def k8s_template(self) -> Path:
        return self.root / "infra" / "k8s" / "gpu-job-template.json"

    @property
    def readme(self) -> Path:
        return self.root / "infra" / "README.md"

    @property
    def prefect_yaml(self) -> Path:
        return self.root / "prefect.yaml"

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def fail(self, path: Path, rule: str, detail: str):
        raise InfraError(f"{self.name(path)}: {rule}: {detail}")


# --------------------------------------------------------------------------- readers

def load_compose(stack: Stack) -> dict:
    try:
        compose = yaml.safe_load(stack.compose.read_text())
    except yaml.YAMLError as exc:
        stack.fail(stack.compose, "yaml", str(exc).replace("\n", " "))
    if not isinstance(compose, dict) or not isinstance(compose.get("services"), dict) or not compose["services"]:
        stack.fail(stack.compose, "services", "no `services:` mapping")
    return compose


def service(stack: Stack, compose: dict, name: str) -> dict:
    if name not in compose["services"]:
        stack.fail(stack.compose, "services", f"service {name!r} is missing")
    return compose["services"][name] or {}


def env_example(stack: Stack) -> dict[str, str]:
    values = {}
    for number, line in enumerate(stack.env_example.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not match:
            stack.fail(stack.env_example, "syntax", f"line {number} is not NAME=value: {line!r}")
        values[match[1]] = match[2]
    return values


# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}, $NAME; $$ escapes
_VAR = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def strings(node) -> list[str]:
    """Every string in a parsed YAML document, keys included (what Compose interpolates; comments are not)."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def variables(compose: dict) -> list[tuple[str, str | None, str]]:
    """(name, operator or None, argument) of every interpolation in the compose file ($$ is a literal $)."""
    found = []
    for text in strings(compose):
        for match in _VAR.finditer(text.replace("$$", "")):
            if match[4]:
                found.append((match[4], None, ""))
            else:
                found.append((match[1], match[2], match[3] or ""))
    return found


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution with .env.example's values (and the defaults where those are empty)."""
    def one(match):
        name, op, arg = match[1] or match[4], match[2], match[3] or ""
        value = env.get(name)
        if op in (":-", "-") and not value:
            return arg
        return value if value else f"<{name}>"
    return _VAR.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def command_text(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value or "")


def command_option(command, option: str) -> str | None:
    """The value of --option=value or --option value in a compose/Dockerfile command."""
    args = command if isinstance(command, list) else command_text(command).split()
    args = [str(a) for a in args]
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option and i + 1 < len(args):
            return args[i + 1]
    return None


def created_databases(stack: Stack) -> set[str]:
    names = {m.lower() for m in re.findall(r"(?im)^\s*CREATE\s+DATABASE\s+\"?([A-Za-z_][A-Za-z0-9_]*)",
                                            stack.init_sql.read_text())}
    if not names:
        stack.fail(stack.init_sql, "databases", "no CREATE DATABASE statement")
    return names


def created_buckets(stack: Stack, compose: dict) -> set[str]:
    init = service(stack, compose, MINIO_INIT)
    text = command_text(init.get("entrypoint")) + "\n" + command_text(init.get("command"))
    buckets = set(re.findall(r"\bmc\s+mb\s+(?:--?[\w-]+\s+)*[\w.-]+/([a-z0-9][a-z0-9.-]+)", text))
    if not buckets:
        stack.fail(stack.compose, "buckets", f"{MINIO_INIT} creates no bucket (`mc mb <alias>/<bucket>`)")
    return buckets


def dockerfile_instructions(stack: Stack) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in stack.dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        continued = stripped.endswith("\\")
        current += " " + (stripped[:-1] if continued else stripped)
        if not continued:
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            current = ""
    if not instructions:
        stack.fail(stack.dockerfile, "syntax", "no instructions")
    return instructions


def dockerfile_uid(stack: Stack) -> int:
    for keyword, args in dockerfile_instructions(stack):
        if keyword == "RUN" and (match := re.search(r"useradd\b[^&;]*--uid\s+(\d+)", args)):
            return int(match[1])
    stack.fail(stack.dockerfile, "non-root USER", "no `useradd --uid N` creating the image's user")


def load_template(stack: Stack) -> dict:
    try:
        template = json.loads(stack.k8s_template.read_text())
    except json.JSONDecodeError as exc:
        stack.fail(stack.k8s_template, "json", str(exc))
    return template


def image_tag(image: str) -> str | None:
    """'repo:tag' -> tag; None when untagged (a digest counts as a tag)."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def image_repo(image: str) -> str:
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]


# --------------------------------------------------------------------------- compose checks

def check_compose_references(stack: Stack) -> None:
    """depends_on targets exist (service_healthy only on services with a healthcheck); images pinned."""
    compose = load_compose(stack)
    services = compose["services"]
    env = env_example(stack)
    for name, spec in services.items():
        spec = spec or {}
        depends = spec.get("depends_on") or {}
        targets = depends.items() if isinstance(depends, dict) else ((t, {}) for t in depends)
        for target, options in targets:
            if target not in services:
                stack.fail(stack.compose, "depends_on", f"{name} depends on {target!r}, which is not a service")
            condition = (options or {}).get("condition", "service_started")
            if condition not in ("service_started", "service_healthy", "service_completed_successfully"):
                stack.fail(stack.compose, "depends_on", f"{name}: unknown condition {condition!r}")
            if condition == "service_healthy" and not (services[target] or {}).get("healthcheck"):
                stack.fail(stack.compose, "depends_on", f"{name} waits for {target} to be healthy, "
                                                        f"but {target} has no healthcheck")
        image = interpolate(str(spec.get("image", "")), env)
        if not image and "build" not in spec:
            stack.fail(stack.compose, "image pin", f"{name} has neither image nor build")
        if image and "build" not in spec and image_tag(image) in (None, "latest"):
            stack.fail(stack.compose, "image pin", f"{name} uses {image!r}: pin a version tag")


def check_compose_volumes(stack: Stack) -> None:
    """Every named volume a service mounts is declared; every bind-mounted path exists."""
    compose = load_compose(stack)
    declared = set((compose.get("volumes") or {}).keys())
    for name, spec in compose["services"].items():
        for mount in (spec or {}).get("volumes") or []:
            if isinstance(mount, dict):
                kind, source = mount.get("type", "volume"), mount.get("source")
            else:
                source = str(mount).split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            if kind == "volume" and source and source not in declared:
                stack.fail(stack.compose, "volumes", f"{name} mounts volume {source!r}, which is not declared "
                                                     "under top-level `volumes:`")
            relative_bind = kind == "bind" and source and not source.startswith(("/", "~", "$"))
            if relative_bind and not (stack.compose.parent / source).exists():
                stack.fail(stack.compose, "volumes", f"{name} bind-mounts {source!r}, which does not exist "
                                                     f"next to {stack.name(stack.compose)}")


def check_compose_variables(stack: Stack) -> None:
    """Every ${VAR} has a default or is in .env.example; .env.example holds only variables compose uses."""
    used = variables(load_compose(stack))
    env = env_example(stack)
    for name, op, _ in used:
        if op in (":-", "-"):
            continue
        if name not in env:
            required = " (required: `:?`)" if op in (":?", "?") else ""
            stack.fail(stack.compose, "variables", f"${{{name}}}{required} has no default and is not in "
                                                   f"{stack.name(stack.env_example)}")
    unused = set(env) - {name for name, _, _ in used}
    if unused:
        stack.fail(stack.env_example, "variables", f"not used by {stack.name(stack.compose)}: {sorted(unused)}")


def published_ports(stack: Stack, compose: dict) -> list[tuple[str, str]]:
    """(service, host port or range) of every published port, variables resolved."""
    env = env_example(stack)
    found = []
    for name, spec in compose["services"].items():
        for port in (spec or {}).get("ports") or []:
            if isinstance(port, dict):
                if port.get("published") is not None:
                    found.append((name, interpolate(str(port["published"]), env)))
                continue
            parts = interpolate(str(port), env).split("/", 1)[0].rsplit(":", 2)  # [ip:]host:container
            if len(parts) >= 2:
                found.append((name, parts[-2]))
    return found


def check_compose_ports(stack: Stack) -> None:
    """No two published host ports collide (with .env.example's values, else the defaults; any host IP)."""
    compose = load_compose(stack)
    seen: dict[int, str] = {}
    for name, port in published_ports(stack, compose):
        if not re.fullmatch(r"\d+(-\d+)?", port):
            stack.fail(stack.compose, "ports", f"{name} publishes host port {port!r}, not a number or range")
        first, _, last = port.partition("-")
        for single in range(int(first), int(last or first) + 1):
            if single in seen:
                stack.fail(stack.compose, "ports", f"host port {single} is published by {seen[single]} and {name}")
            seen[single] = name


def check_compose_databases(stack: Stack) -> None:
    """MLflow's backend store and Prefect's database are on the postgres service, in databases init.sql creates."""
    compose = load_compose(stack)
    env = env_example(stack)
    databases = created_databases(stack)
    postgres = service(stack, compose, POSTGRES)
    if not str(postgres.get("image", "")).startswith("postgres:"):
        stack.fail(stack.compose, "databases", f"service {POSTGRES!r} is not a postgres image")
    init_name = stack.name(stack.init_sql).removeprefix("infra/")
    if not any(str(m).startswith(f"./{init_name}:/docker-entrypoint-initdb.d") for m in postgres.get("volumes") or []):
        stack.fail(stack.compose, "databases", f"{POSTGRES} does not mount ./{init_name} into "
                                               "/docker-entrypoint-initdb.d")
    mlflow_uri = command_option(service(stack, compose, MLFLOW).get("command"), "--backend-store-uri")
    prefect_env = service(stack, compose, PREFECT_SERVER).get("environment") or {}
    prefect_uri = (prefect_env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
                   or prefect_env.get("PREFECT_API_DATABASE_CONNECTION_URL"))
    for who, uri, driver in [(MLFLOW, mlflow_uri, "postgresql+psycopg2"), (PREFECT_SERVER, prefect_uri,
                                                                          "postgresql+asyncpg")]:
        if not uri:
            stack.fail(stack.compose, "databases", f"{who} has no database URL")
        url = urlsplit(interpolate(uri, env))
        if url.scheme != driver:
            stack.fail(stack.compose, "databases", f"{who}'s database URL uses {url.scheme!r}, not {driver!r}")
        if url.hostname != POSTGRES:
            stack.fail(stack.compose, "databases", f"{who}'s database URL points at {url.hostname!r}, "
                                                   f"not the {POSTGRES!r} service")
        database = url.path.lstrip("/")
        if database not in databases:
            stack.fail(stack.compose, "databases", f"{who} uses database {database!r}, which "
                                                   f"{stack.name(stack.init_sql)} does not create "
                                                   f"({sorted(databases)})")


def check_compose_buckets(stack: Stack) -> None:
    """minio-init creates MLflow's artifact bucket and the README's DVC remote bucket."""
    compose = load_compose(stack)
    buckets = created_buckets(stack, compose)
    destination = command_option(service(stack, compose, MLFLOW).get("command"), "--artifacts-destination")
    if not destination or not destination.startswith("s3://"):
        stack.fail(stack.compose, "buckets", f"{MLFLOW} has no --artifacts-destination s3://...")
    if urlsplit(destination).hostname not in buckets:
        stack.fail(stack.compose, "buckets", f"{MLFLOW} stores artifacts in {destination}, but {MINIO_INIT} "
                                             f"creates only {sorted(buckets)}")
    remotes = re.findall(r"dvc remote add\s+(?:-\S+\s+)*\S+\s+s3://([a-z0-9][a-z0-9.-]+)", stack.readme.read_text())
    if not remotes:
        stack.fail(stack.readme, "buckets", "no `dvc remote add ... s3://<bucket>` command")
    for bucket in remotes:
        if bucket not in buckets:
            stack.fail(stack.readme, "buckets", f"the DVC remote uses bucket {bucket!r}, but {MINIO_INIT} in "
                                                f"{stack.name(stack.compose)} creates only {sorted(buckets)}")


def check_compose_worker(stack: Stack) -> None:
    """The worker talks to the compose servers, and polls a work pool of prefect.yaml (so does the image's CMD)."""
    compose = load_compose(stack)
    worker = service(stack, compose, WORKER)
    environment = worker.get("environment") or {}
    for variable, target in [("PREFECT_API_URL", PREFECT_SERVER), ("MLFLOW_TRACKING_URI", MLFLOW)]:
        host = urlsplit(str(environment.get(variable, ""))).hostname
        if host != target:
            stack.fail(stack.compose, "service urls", f"{WORKER}'s {variable} points at {host!r}, "
                                                      f"not the {target!r} service")
    deployments = (yaml.safe_load(stack.prefect_yaml.read_text()) or {}).get("deployments") or []
    pools = {((d.get("work_pool") or {}).get("name")) for d in deployments} - {None}
    pool = command_option(worker.get("command"), "--pool")
    if pool not in pools:
        stack.fail(stack.compose, "work pool", f"{WORKER} polls {pool!r}, but the deployments in "
                                               f"{stack.name(stack.prefect_yaml)} use {sorted(pools)}")
    cmd = [args for keyword, args in dockerfile_instructions(stack) if keyword == "CMD"]
    image_pool = command_option(json.loads(cmd[-1]) if cmd and cmd[-1].startswith("[") else (cmd or [""])[-1],
                                "--pool")
    if image_pool not in pools:
        stack.fail(stack.dockerfile, "work pool", f"CMD polls {image_pool!r}, but the deployments in "
                                                  f"{stack.name(stack.prefect_yaml)} use {sorted(pools)}")


# --------------------------------------------------------------------------- Dockerfile checks

def check_dockerfile(stack: Stack) -> None:
    """FROM pinned, pip bound to requirements.lock (project: -c lock -e .), non-root USER, project dir."""
    instructions = dockerfile_instructions(stack)
    stages = set()
    for keyword, args in instructions:
        if keyword != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        image = words[0]
        unpinned = "$" in image or image_tag(image) in (None, "latest")
        if image not in stages and image != "scratch" and unpinned:
            stack.fail(stack.dockerfile, "FROM pinned", f"FROM {image}: pin a version tag (not latest)")
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    installs = [cmd for run in runs for cmd in re.split(r"&&|;", run) if re.search(r"\bpip3?\s+install\b", cmd)]
    if not installs:
        stack.fail(stack.dockerfile, "pip constraints", "no `pip install`")
    for cmd in installs:
        if not re.search(r"(?:-c|--constraint|-r|--requirement)[ =]\S*requirements\.lock\b", cmd):
            stack.fail(stack.dockerfile, "pip constraints", f"`{cmd.strip()}` is not bound to requirements.lock "
                                                            "(-c or -r)")
    if not any(re.search(r"(?:-c|--constraint)[ =]\S*requirements\.lock\b", c) and re.search(r"\s-e\s+\.(\s|$)", c)
               for c in installs):
        stack.fail(stack.dockerfile, "pip constraints", "the project is not installed with "
                                                        "`pip install -c requirements.lock -e .`")
    users = [args.split(":")[0] for keyword, args in instructions if keyword == "USER"]
    if not users or users[-1] in ("root", "0"):
        stack.fail(stack.dockerfile, "non-root USER", f"the final USER is {users[-1] if users else 'root (none set)'}")
    workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
    env_text = " ".join(args for keyword, args in instructions if keyword == "ENV")
    project_dir = re.search(r"\bMMRAD_PROJECT_DIR[= ](\S+)", env_text)
    project_dir = project_dir[1] if project_dir else None
    workdir = workdirs[-1] if workdirs else None
    if not project_dir or workdir != project_dir:
        stack.fail(stack.dockerfile, "project dir", f"ENV MMRAD_PROJECT_DIR ({project_dir}) must equal the final "
                                                    f"WORKDIR ({workdir})")


# --------------------------------------------------------------------------- Kubernetes template checks

class _NoClient:
    """Stands in for the Prefect API client: rendering this template must not need one."""

    def __getattr__(self, name):
        raise AssertionError(f"the template needs the Prefect API ({name}): no block or variable placeholders")


def prefect_default_kubernetes_template() -> dict:
    """The default Kubernetes base job template shipped with the installed Prefect (its worker registry)."""
    import prefect

    registry = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    for workers in json.loads(registry.read_text()).values():
        for worker in workers.values():
            if worker.get("type") == "kubernetes":
                return worker["default_base_job_configuration"]
    raise LookupError("Prefect's worker registry has no kubernetes worker")


def example_values(template: dict) -> dict[str, Any]:
    """A value for every required variable without a default: its schema's first example (as a deployment would)."""
    props = template["variables"].get("properties", {})
    return {name: (props[name].get("examples") or [f"<{name}>"])[0]
            for name in template["variables"].get("required", []) if "default" not in props.get(name, {})}


def render_template(template: dict, values: dict[str, Any]) -> dict:
    """The job configuration Prefect builds from the template and job variables (rendered offline)."""
    from prefect.workers.base import BaseJobConfiguration
    from pydantic import ConfigDict

    class JobConfiguration(BaseJobConfiguration):
        model_config = ConfigDict(extra="allow")

    config = asyncio.run(JobConfiguration.from_template_and_values(template, values, client=_NoClient()))
    return config.model_dump()


def check_k8s_template(stack: Stack) -> None:
    """Prefect accepts the template; rendered, it is a GPU batch/v1 Job with the MLflow/S3 environment."""
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import ValidationError as SchemaValidationError
    from prefect.utilities.schema_tools import is_valid_schema, validate
    from prefect.workers.base import BaseJobConfiguration
    from pydantic import ValidationError

    path = stack.k8s_template
    template = load_template(stack)
    try:  # what the Prefect server runs on `prefect work-pool create --base-job-template`
        WorkPoolCreate(name="mmrad-gpu", type="kubernetes", base_job_template=template)
    except ValidationError as exc:
        stack.fail(path, "prefect base job template", "; ".join(e["msg"] for e in exc.errors()))
    schema = template["variables"]
    try:  # the checks of the server's job-variable validation (prefect.server.api.validation)
        is_valid_schema(schema, preprocess=False)
        defaults = BaseJobConfiguration._get_base_config_defaults(schema.get("properties", {}))
        validate(defaults, schema, raise_on_error=True, preprocess=True, ignore_required=True,
                 allow_none_with_default=True)
        values = example_values(template)
        validate({**defaults, **values}, schema, raise_on_error=True, preprocess=True, ignore_required=False,
                 allow_none_with_default=True)
    except (ValueError, SchemaValidationError) as exc:
        stack.fail(path, "variables schema", str(exc).splitlines()[0])

    default = prefect_default_kubernetes_template()
    missing = set(default["job_configuration"]) - set(template["job_configuration"])
    if missing:
        stack.fail(path, "kubernetes worker shape", f"job_configuration lacks {sorted(missing)} "
                                                    "(keys of Prefect's default Kubernetes template)")

    rendered = render_template(template, values)
    manifest = rendered.get("job_manifest")
    if not isinstance(manifest, dict):
        stack.fail(path, "job manifest", "job_configuration.job_manifest is not an object")
    leftover = re.findall(r"\{\{[^}]*\}\}", json.dumps(manifest))
    if leftover:
        stack.fail(path, "job manifest", f"placeholders left after rendering: {sorted(set(leftover))}")
    # the structure prefect-kubernetes' KubernetesWorkerJobConfiguration requires (_get_base_job_manifest)
    spec = manifest.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or [{}]
    for where, got, wanted in [("apiVersion", manifest.get("apiVersion"), "batch/v1"),
                               ("kind", manifest.get("kind"), "Job"),
                               ("spec.template.spec.parallelism", pod.get("parallelism"), 1),
                               ("spec.template.spec.completions", pod.get("completions"), 1),
                               ("spec.template.spec.restartPolicy", pod.get("restartPolicy"), "Never"),
                               ("spec.template.spec.containers[0].name", containers[0].get("name"), "prefect-job"),
                               ("spec.backoffLimit", spec.get("backoffLimit"), 0)]:
        if got != wanted:
            stack.fail(path, "job manifest", f"{where} is {got!r}, must be {wanted!r}")
    labels = (manifest.get("metadata") or {}).get("labels")
    if labels is not None and not isinstance(labels, dict):  # absent is fine: the worker adds its own
        stack.fail(path, "job manifest", f"metadata.labels is {labels!r}, must be an object")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or ttl <= 0:
        stack.fail(path, "job manifest", f"spec.ttlSecondsAfterFinished is {ttl!r}: finished jobs would pile up")
    container = containers[0]
    gpus = ((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
    if gpus is None or not str(gpus).isdigit() or int(gpus) < 1:
        stack.fail(path, "gpu", f"the container's resources.limits['nvidia.com/gpu'] is {gpus!r}")
    if not pod.get("nodeSelector") and not pod.get("affinity"):
        stack.fail(path, "gpu", "no nodeSelector or affinity: the pod may land on a node without a GPU")
    if not isinstance(pod.get("tolerations"), list):
        stack.fail(path, "gpu", "no tolerations list (GPU nodes are usually tainted)")
    wanted_image = values.get("image") or defaults.get("image")
    if not container.get("image") or (wanted_image and container["image"] != wanted_image):
        stack.fail(path, "training image", f"the container's image is {container.get('image')!r}, "
                                           f"the image variable {wanted_image!r}")
    env = {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}
    for entry in env.values():
        if "value" not in entry and "valueFrom" not in entry:
            stack.fail(path, "environment", f"{entry['name']} renders without a value: make its variable "
                                            "required or give it a default")
    if not env.get("MLFLOW_TRACKING_URI", {}).get("value"):
        stack.fail(path, "environment", "the container has no MLFLOW_TRACKING_URI")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if "secretKeyRef" not in (env.get(key, {}).get("valueFrom") or {}):
            stack.fail(path, "environment", f"{key} must come from a Secret (valueFrom.secretKeyRef)")
    security = pod.get("securityContext") or {}
    uid = dockerfile_uid(stack)
    if security.get("runAsNonRoot") is not True or security.get("runAsUser") != uid:
        stack.fail(path, "non-root", f"securityContext must set runAsNonRoot: true and runAsUser: {uid} "
                                     f"(the Dockerfile's user), got {security}")
    compose = load_compose(stack)
    worker_image = interpolate(str(service(stack, compose, WORKER).get("image", "")), env_example(stack))
    example = (schema["properties"].get("image", {}).get("examples") or [""])[0]
    if image_repo(example) != image_repo(worker_image):
        stack.fail(path, "training image", f"the image variable's example {example!r} is not the training image "
                                           f"{worker_image!r} of {stack.name(stack.compose)}")


# --------------------------------------------------------------------------- the real files

CHECKS = [check_compose_references, check_compose_volumes, check_compose_variables, check_compose_ports,
          check_compose_databases, check_compose_buckets, check_compose_worker, check_dockerfile,
          check_k8s_template]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_infra_files_pass(check):
    check(Stack(ROOT))


def test_rendered_job_uses_the_pool_defaults():
    """What a deployment that sets only the required variables gets: the pool defaults, rendered by Prefect."""
    template = json.loads(Stack(ROOT).k8s_template.read_text())
    manifest = render_template(template, example_values(template))["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert manifest["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {e["name"] for e in container["env"]} >= {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                                                      "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# --------------------------------------------------------------------------- the checks bite

def broken_copy(tmp_path: Path, relative: str, edit: Callable[[str], str]) -> Stack:
    """The infra files and prefect.yaml copied under tmp_path, with one file edited."""
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    shutil.copy(ROOT / "prefect.yaml", tmp_path / "prefect.yaml")
    target = tmp_path / relative
    before = target.read_text()
    after = edit(before)
    assert after != before, f"the edit did not change {relative}"
    target.write_text(after)
    return Stack(tmp_path)


def replace(old: str, new: str, count: int = 1) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"{old!r} not found"
        return text.replace(old, new, count)
    return edit


def edit_json(change: Callable[[dict], None]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        data = json.loads(text)
        change(data)
        return json.dumps(data)
    return edit


def _container(template: dict) -> dict:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


BROKEN = [
    # (id, check, file, edit, expected message)
    ("depends_on", check_compose_references, "infra/compose.yaml",
     replace("      minio-init:\n        condition: service_completed_successfully",
             "      minio-setup:\n        condition: service_completed_successfully"),
     r"infra/compose\.yaml: depends_on: mlflow depends on 'minio-setup'"),
    ("image pin", check_compose_references, "infra/compose.yaml",
     replace("image: postgres:15.10", "image: postgres:latest"),
     r"infra/compose\.yaml: image pin: postgres uses 'postgres:latest'"),
    ("volumes", check_compose_volumes, "infra/compose.yaml",
     replace("  dvc-cache:\n", ""),
     r"infra/compose\.yaml: volumes: prefect-worker mounts volume 'dvc-cache'"),
    ("variables", check_compose_variables, "infra/.env.example",
     replace("POSTGRES_PASSWORD=\n", ""),
     r"infra/compose\.yaml: variables: \$\{POSTGRES_PASSWORD\} \(required: `:\?`\) has no default"),
    ("unused variable", check_compose_variables, "infra/.env.example",
     lambda text: text + "MLFLOW_PASSWORD=\n",
     r"infra/\.env\.example: variables: not used by infra/compose\.yaml: \['MLFLOW_PASSWORD'\]"),
    ("ports", check_compose_ports, "infra/.env.example",
     replace("PREFECT_PORT=4200", "PREFECT_PORT=5000"),
     r"infra/compose\.yaml: ports: host port 5000 is published by mlflow and prefect-server"),
    ("databases", check_compose_databases, "infra/postgres/init.sql",
     replace("CREATE DATABASE prefect;", "CREATE DATABASE orion;"),
     r"infra/compose\.yaml: databases: prefect-server uses database 'prefect', which infra/postgres/init\.sql"),
    ("database host", check_compose_databases, "infra/compose.yaml",
     replace("@postgres:5432/mlflow", "@localhost:5432/mlflow"),
     r"infra/compose\.yaml: databases: mlflow's database URL points at 'localhost'"),
    ("buckets", check_compose_buckets, "infra/compose.yaml",
     replace("--artifacts-destination=s3://mlflow/", "--artifacts-destination=s3://artifacts/"),
     r"infra/compose\.yaml: buckets: mlflow stores artifacts in s3://artifacts/"),
    ("readme bucket", check_compose_buckets, "infra/README.md",
     replace("dvc remote add -d team s3://dvc", "dvc remote add -d team s3://data"),
     r"infra/README\.md: buckets: the DVC remote uses bucket 'data'"),
    ("work pool", check_compose_worker, "prefect.yaml",
     replace("name: mmrad-process", "name: mmrad-cpu"),
     r"infra/compose\.yaml: work pool: prefect-worker polls 'mmrad-process'"),
    ("service urls", check_compose_worker, "infra/compose.yaml",
     replace("MLFLOW_TRACKING_URI: http://mlflow:5000", "MLFLOW_TRACKING_URI: http://localhost:5000"),
     r"infra/compose\.yaml: service urls: prefect-worker's MLFLOW_TRACKING_URI points at 'localhost'"),
    ("FROM pinned", check_dockerfile, "infra/Dockerfile",
     replace("FROM python:3.11.13-slim-bookworm\n\n", "FROM python:latest\n\n"),
     r"infra/Dockerfile: FROM pinned: FROM python:latest"),
    ("pip constraints", check_dockerfile, "infra/Dockerfile",
     replace("pip install -c requirements.lock -e .", "pip install -e ."),
     r"infra/Dockerfile: pip constraints: `pip install -e \.` is not bound to requirements\.lock"),
    ("non-root USER", check_dockerfile, "infra/Dockerfile",
     replace("USER mmrad", "USER root"),
     r"infra/Dockerfile: non-root USER: the final USER is root"),
    ("project dir", check_dockerfile, "infra/Dockerfile",
     replace("WORKDIR /opt/mmrad", "WORKDIR /app"),
     r"infra/Dockerfile: project dir: ENV MMRAD_PROJECT_DIR \(/opt/mmrad\) must equal the final WORKDIR \(/app\)"),
    ("image's pool", check_compose_worker, "infra/Dockerfile",
     replace('CMD ["prefect", "worker", "start", "--pool", "mmrad-process"',
             'CMD ["prefect", "worker", "start", "--pool", "default"'),
     r"infra/Dockerfile: work pool: CMD polls 'default'"),
    ("json", check_k8s_template, "infra/k8s/gpu-job-template.json",
     lambda text: text.rstrip().rstrip("}"),
     r"infra/k8s/gpu-job-template\.json: json: "),
    ("undeclared variable", check_k8s_template, "infra/k8s/gpu-job-template.json",
     edit_json(lambda t: t["variables"]["properties"].pop("gpu_count")),
     r"infra/k8s/gpu-job-template\.json: prefect base job template: .*undeclared variable\(s\): gpu_count"),
    ("bad default", check_k8s_template, "infra/k8s/gpu-job-template.json",
     edit_json(lambda t: t["variables"]["properties"]["gpu_count"].update(default="one")),
     r"infra/k8s/gpu-job-template\.json: variables schema: "),
    ("no gpu", check_k8s_template, "infra/k8s/gpu-job-template.json",
     edit_json(lambda t: _container(t)["resources"]["limits"].pop("nvidia.com/gpu")),
     r"infra/k8s/gpu-job-template\.json: gpu: the container's resources\.limits\['nvidia\.com/gpu'\] is None"),
    ("not a job", check_k8s_template, "infra/k8s/gpu-job-template.json",
     edit_json(lambda t: t["job_configuration"]["job_manifest"].update(kind="Pod")),
     r"infra/k8s/gpu-job-template\.json: job manifest: kind is 'Pod', must be 'Job'"),
    ("value dropped", check_k8s_template, "infra/k8s/gpu-job-template.json",
     edit_json(lambda t: t["variables"]["required"].remove("mlflow_tracking_uri")),
     r"infra/k8s/gpu-job-template\.json: environment: MLFLOW_TRACKING_URI renders without a value"),
    ("secret", check_k8s_template, "infra/k8s/gpu-job-template.json",
     edit_json(lambda t: _container(t)["env"].__setitem__(2, {"name": "AWS_ACCESS_KEY_ID", "value": "mmrad"})),
     r"infra/k8s/gpu-job-template\.json: environment: AWS_ACCESS_KEY_ID must come from a Secret"),
    ("user id", check_k8s_template, "infra/Dockerfile",
     replace("--uid 1000", "--uid 1001"),
     r"infra/k8s/gpu-job-template\.json: non-root: securityContext must set runAsNonRoot: true and runAsUser: 1001"),
    ("training image", check_k8s_template, "infra/.env.example",
     replace("MMRAD_IMAGE=mmrad-train:0.1.0", "MMRAD_IMAGE=mmrad-trainer:0.1.0"),
     (r"infra/k8s/gpu-job-template\.json: training image: the image variable's example "
      r"'registry\.example\.com/mmrad-train:0\.1\.0' is not the training image 'mmrad-trainer:0\.1\.0'")),
    ("shape", check_k8s_template, "infra/k8s/gpu-job-template.json",
     edit_json(lambda t: t["job_configuration"].pop("stream_output")),
     r"infra/k8s/gpu-job-template\.json: kubernetes worker shape: job_configuration lacks \['stream_output'\]"),
]


@pytest.mark.parametrize("check, relative, edit, message", [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_checks_catch_broken_copies(tmp_path, check, relative, edit, message):
    stack = broken_copy(tmp_path, relative, edit)
    with pytest.raises(InfraError, match=message):
        check(stack)


def test_service_healthy_needs_a_healthcheck(tmp_path):
    def drop_minio_healthcheck(text: str) -> str:
        compose = yaml.safe_load(text)
        del compose["services"]["minio"]["healthcheck"]
        return yaml.safe_dump(compose)

    stack = broken_copy(tmp_path, "infra/compose.yaml", drop_minio_healthcheck)
    with pytest.raises(InfraError, match=r"infra/compose\.yaml: depends_on: minio-init waits for minio to be "
                                         r"healthy, but minio has no healthcheck"):
        check_compose_references(stack)


def test_every_check_has_a_broken_copy():
    assert {case[1] for case in BROKEN} == set(CHECKS)
