"""compose.yaml: the services, ports, health checks, dependencies and env wiring."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {str(k): str(v) for k, v in env.items()}


def test_services_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "postgres", "migrate", "worker"} <= services.keys()
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"] == "postgres:16"
    assert "migrate" in services["migrate"]["command"]
    assert services["migrate"]["restart"] == "no"
    for name in ("migrate", "worker"):
        assert services[name]["build"]["context"] == "."
    assert (ROOT / services["worker"]["build"]["dockerfile"]).is_file()


def test_kafka_is_single_node_kraft(compose: dict[str, Any]) -> None:
    env = _env(compose["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@kafka:")
    assert "ZOOKEEPER" not in " ".join(env)
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


def test_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "${LOQUETIER_KAFKA_PORT:-9092}:9092" in services["kafka"]["ports"]
    # the host side can move; 5432 is left to a local PostgreSQL
    assert "${LOQUETIER_PG_PORT:-15432}:5432" in services["postgres"]["ports"]
    assert "${LOQUETIER_METRICS_PORT:-9400}:9400" in services["worker"]["ports"]
    advertised = _env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert "EXTERNAL://localhost:${LOQUETIER_KAFKA_PORT:-9092}" in advertised  # follows the host port


def test_kafka_data_is_on_its_volume(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    mounts = dict(str(v).split(":", 1) for v in kafka["volumes"])
    assert mounts["kafka-data"] == _env(kafka)["KAFKA_LOG_DIRS"]


def test_every_loquetier_variable_is_a_setting_that_is_read(compose: dict[str, Any]) -> None:
    from loquetier.settings import Settings

    sources = "\n".join(p.read_text() for folder in ("loquetier", "workers", "producers")
                        for p in (ROOT / folder).rglob("*.py") if p.name != "settings.py")
    for name, service in compose["services"].items():
        for key in _env(service):
            if not key.startswith("LOQUETIER_"):
                continue
            group, _, field = key.removeprefix("LOQUETIER_").lower().partition("__")
            model = Settings.model_fields[group].annotation
            assert field in model.model_fields, (name, key)  # type: ignore[union-attr]
            assert f".{field}" in sources, (name, key)  # some code reads it


def test_health_checks_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("kafka", "postgres", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["kafka"]["condition"] == "service_healthy"
    assert worker_deps["postgres"]["condition"] == "service_healthy"
    assert worker_deps["migrate"]["condition"] == "service_completed_successfully"


def test_env_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka_env, pg_env = _env(services["kafka"]), _env(services["postgres"])
    advertised = {entry.split("://")[1] for entry in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name in ("migrate", "worker"):
        env = _env(services[name])
        assert env["LOQUETIER_KAFKA__BOOTSTRAP"] in advertised, name
        assert env["LOQUETIER_KAFKA__BOOTSTRAP"].startswith("kafka:")
        url = make_url(env["LOQUETIER_DATABASE__URL"])
        assert url.drivername == "postgresql+asyncpg" and url.host == "postgres" and url.port == 5432
        assert (url.username, url.password, url.database) == (
            pg_env["POSTGRES_USER"],
            pg_env["POSTGRES_PASSWORD"],
            pg_env["POSTGRES_DB"],
        )


def test_gpu_worker_is_optional(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]  # not started by a plain `docker compose up`
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in compose["services"]["worker"]  # the CPU worker always starts
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert gpu["image"] != compose["services"]["worker"]["image"]
    assert _env(gpu)["LOQUETIER_ENGINE__DEVICE"] == "cuda"  # never a silent CPU fallback


def test_dockerfile_honours_the_constraints() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY scripts/constraints.txt" in text and "pip install -c /tmp/constraints.txt" in text
    assert "ARG TORCH_INDEX_URL" in text and '"torch==${TORCH_VERSION}"' in text
    version = text.split("ARG TORCH_VERSION=")[1].split()[0]
    assert f"LOQUETIER_TORCH_VERSION:-{version}" in (ROOT / "scripts" / "bootstrap.sh").read_text()  # CI's torch


def test_dockerfile_copies_the_package_folders() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for folder in ("loquetier", "kernels", "workers", "producers", "migrations"):
        assert f"COPY {folder} ./{folder}" in text
        assert (ROOT / folder).is_dir()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) not installed")
def test_docker_compose_config_validates() -> None:
    for args in ([], ["--profile", "gpu"]):
        done = subprocess.run(
            ["docker-compose", "-f", str(ROOT / "compose.yaml"), *args, "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
