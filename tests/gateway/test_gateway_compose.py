"""compose.yaml's gateway service: wired to the same broker and database as the worker, healthy on /health."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_gateway_service() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    gateway, worker = services["gateway"], services["worker"]
    assert gateway["command"][:2] == ["loquetier", "gateway"] and "0.0.0.0" in gateway["command"]
    assert "8000:8000" in gateway["ports"]
    for name in ("LOQUETIER_KAFKA__BOOTSTRAP", "LOQUETIER_DATABASE__URL"):
        assert gateway["environment"][name] == worker["environment"][name]
    assert gateway["environment"]["LOQUETIER_GATEWAY__ID"]
    assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "/health" in " ".join(gateway["healthcheck"]["test"])
