"""The deployment files agree with the code: compose services, commands, env names, image targets.

Fast and offline: nothing here needs Docker. Commands are checked by parsing them with the real CLI
(`distill <cmd> ... --help` through typer's CliRunner), env names against the Settings model.
"""

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PROJECT_SERVICES = ("migrate", "api", "worker")  # run this project's code
ALL_SERVICES = ("postgres", "redis", "minio", "minio-setup", *PROJECT_SERVICES)
runner = CliRunner()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def parse_dockerfile(text: str) -> dict[str, dict]:
    """Stages by name: {"from": image, "instructions": [(KEYWORD, args), ...]}; comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    result: dict[str, dict] = {}
    current = None
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, line
            current = {"from": m.group(1), "instructions": []}
            result[m.group(2) or f"stage{len(result)}"] = current
        elif current is not None:
            current["instructions"].append((keyword, args.strip()))
    return result


def _expand(value: str) -> str:
    """Compose-style ${VAR:-default} → default (these tests see no .env)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(value))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _expand(v) for k, v in env.items()}


def _assert_runs_project_code(argv: list[str]) -> None:
    """`distill ...` must parse with the real CLI; `python -m uvicorn mod:attr` must import."""
    argv = [str(a) for a in argv]
    if argv[0] == "distill":
        result = runner.invoke(cli_app, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{argv}: {result.output}"
        return
    if "uvicorn" in argv:
        target = next(a for a in argv if re.fullmatch(r"[\w.]+:[\w]+", a))
        module, attr = target.split(":")
        assert hasattr(importlib.import_module(module), attr), target
        return
    if "celery" in argv:
        target = argv[argv.index("-A") + 1]
        module, _, attr = target.partition(":")
        source = ROOT / (module.replace(".", "/") + ".py")
        # The worker app imports torch; check the module defines it without importing it here.
        assert re.search(rf"^{attr or 'app'}\s*=", source.read_text(), re.MULTILINE), target
        return
    raise AssertionError(f"unrecognised project command {argv}")


# ---- docker-compose.yml ---------------------------------------------------------------------------


def test_every_service_is_declared(compose):
    assert set(ALL_SERVICES) <= set(compose["services"])


def test_start_order_follows_health_and_migration(compose):
    svc = compose["services"]
    assert svc["postgres"]["healthcheck"]["test"]
    assert svc["redis"]["healthcheck"]["test"]
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = svc[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["minio-setup"]["condition"] == "service_completed_successfully", name
    assert svc["minio-setup"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for one_shot in ("migrate", "minio-setup"):
        assert svc[one_shot].get("restart") in ("no", None)


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_project_commands_exist(compose, name):
    command = compose["services"][name]["command"]
    _assert_runs_project_code(command if isinstance(command, list) else command.split())


def test_migrate_runs_the_migration_command(compose):
    assert compose["services"]["migrate"]["command"][:2] == ["distill", "migrate"]
    assert compose["services"]["worker"]["command"][:2] == ["distill", "worker"]


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_env_names_are_settings_fields(compose, name):
    env = _env(compose["services"][name])
    assert env, name
    fields = set(Settings.model_fields)
    unknown = [k for k in env if not k.startswith("AWS_") and k.lower() not in fields]
    assert not unknown, f"{name}: {unknown} are not Settings fields"
    # ... and the values validate as Settings (types, ranges), with no .env file in play.
    settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items() if not k.startswith("AWS_")})
    assert settings.sqlalchemy_url.startswith("postgresql+psycopg://")
    assert settings.broker_url.startswith("redis://")
    assert settings.store_url.startswith("s3://") and settings.s3_endpoint_url
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)


def test_api_publishes_to_the_queue_the_gpu_worker_consumes(compose):
    svc = compose["services"]
    assert _env(svc["api"])["QUEUE"] == "gpu" == _env(svc["worker"])["QUEUE"]
    assert "--gpus" in svc["worker"]["command"]


def test_bucket_created_is_the_bucket_used(compose):
    svc = compose["services"]
    bucket = _env(svc["api"])["STORAGE_URL"].removeprefix("s3://").split("/", 1)[0]
    setup = svc["minio-setup"]
    script = " ".join(setup["command"]) if isinstance(setup["command"], list) else setup["command"]
    assert "mc mb" in script
    assert _env(setup).get("S3_BUCKET") == bucket or f"local/{bucket}" in script
    # the S3 credentials the services use are MinIO's root credentials
    minio = _env(svc["minio"])
    assert _env(svc["worker"])["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert _env(svc["worker"])["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]


def test_worker_reserves_gpus(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and d.get("count") == "all" and "gpu" in d.get("capabilities", [])
               for d in devices)  # fmt: skip
    assert "deploy" not in compose["services"]["api"]  # the API needs no GPU


def test_build_targets_exist(compose, stages):
    for name, target in (("migrate", "api"), ("api", "api"), ("worker", "worker")):
        build = compose["services"][name]["build"]
        assert build["target"] == target and target in stages, name


# ---- Dockerfile -----------------------------------------------------------------------------------


def _stage_chain(stages: dict, name: str) -> list[str]:
    chain = [name]
    while stages[chain[-1]]["from"] in stages:
        chain.append(stages[chain[-1]]["from"])
    return chain


def _text(stages: dict, names: list[str]) -> str:
    return "\n".join(f"{k} {a}" for n in names for k, a in stages[n]["instructions"])


def test_dockerfile_has_api_and_worker_targets_on_python_311_slim(stages):
    assert {"api", "worker"} <= set(stages)
    for target in ("api", "worker"):
        root = _stage_chain(stages, target)[-1]
        assert stages[root]["from"].startswith("python:3.11-slim"), target


def test_torch_only_in_the_worker_image(stages):
    api_text = _text(stages, _stage_chain(stages, "api"))
    assert "torch" not in api_text.lower()
    assert "[worker" not in api_text  # the worker extra pulls torch
    worker_text = _text(stages, ["worker"])
    assert re.search(r"pip install\s+\"?torch==", worker_text)
    assert "requirements-worker" in worker_text or "[worker]" in worker_text


@pytest.mark.parametrize("target", ["api", "worker"])
def test_image_commands_exist(stages, target):
    cmds = [a for k, a in stages[target]["instructions"] if k == "CMD"]
    assert cmds, target
    _assert_runs_project_code(json.loads(cmds[-1]))


def test_api_image_serves_on_all_interfaces_port_8000(stages):
    cmd = json.loads([a for k, a in stages["api"]["instructions"] if k == "CMD"][-1])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    assert any(k == "EXPOSE" and "8000" in a for k, a in stages["api"]["instructions"])


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "var", ".git"} <= ignored


# ---- Makefile -------------------------------------------------------------------------------------


def test_makefile_targets_and_torch_first():
    text = (ROOT / "Makefile").read_text()
    for target in ("install", "up", "test", "lint", "bench", "clean"):
        assert re.search(rf"^{target}:", text, re.MULTILINE), target
    torch_at = text.index('install "torch==$(TORCH_VERSION)"')
    assert torch_at < text.index("install -e '.[worker,dev]'")
    assert re.search(r"^TORCH_VERSION \?= 2\.13\.0$", text, re.MULTILINE)
    assert '-m pytest -q -m "" tests' in text
