"""Fixtures of the dashboards suite: the repository's generated dashboards and provisioning."""

from __future__ import annotations

import pytest
import yaml

from dashboards import generate
from dashboards.queries import load_json
from tests.conftest import ROOT


@pytest.fixture(scope="session")
def dashboards() -> dict[str, dict]:
    """uid -> dashboard JSON as committed in dashboards/json."""
    data = load_json(ROOT)
    assert data, "dashboards/json is empty: run `mailgenius build`"
    return data


@pytest.fixture(scope="session")
def provisioned_uids() -> dict[str, str]:
    """Datasource uid -> type, as Grafana's provisioning defines them."""
    path = ROOT / "dashboards" / "provisioning" / "datasources" / "mailgenius.yml"
    data = yaml.safe_load(path.read_text())
    return {ds["uid"]: ds["type"] for ds in data["datasources"]}


@pytest.fixture(scope="session")
def provisioned_names() -> dict[str, str]:
    """Datasource name -> type, as Grafana's provisioning defines them."""
    path = ROOT / "dashboards" / "provisioning" / "datasources" / "mailgenius.yml"
    data = yaml.safe_load(path.read_text())
    return {ds["name"]: ds["type"] for ds in data["datasources"]}


@pytest.fixture(scope="session")
def alloy():
    """dashboards/logging/config.alloy, parsed (Grafana Alloy ships the containers' logs)."""
    from tests.dashboards.alloy_config import parse

    return parse((ROOT / "dashboards" / "logging" / "config.alloy").read_text())


@pytest.fixture(scope="session")
def generate_module():
    return generate
