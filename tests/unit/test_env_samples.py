"""The settings' documentation keeps up with the code: every environment variable the processes
read is in a service's `.env.sample` with its real default, and in the README's table."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from services.common import config as config_module
from services.common.config import Config

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted(ROOT.glob("services/*/.env.sample"))
# Read by the stack script too, and documented with it in the README: the URL defaults follow
# them, so a service's sample sets the URLs instead.
STACK_PORTS = {"POSTGRES_PORT", "REDIS_PORT", "KAFKA_PORT"}
# Read outside `Config` (services/common/api.py): the access log's level.
OUTSIDE_CONFIG = {"ACCESS_LOG"}


def names_read_by_config() -> set[str]:
    """The variables `services/common/config.py` reads: the first argument of its `_env*`."""
    tree = ast.parse(Path(config_module.__file__).read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id.startswith("_env")
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }


def sample_settings(path: Path) -> dict[str, str]:
    settings = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def test_there_is_a_sample_per_service() -> None:
    assert [p.parent.name for p in SAMPLES] == ["gateway", "orders", "payments"]


def test_every_setting_is_in_a_sample_and_every_sample_line_is_a_setting() -> None:
    read = names_read_by_config() | OUTSIDE_CONFIG
    assert {"ORDERS_DATABASE_URL", "DB_DEAD_PEER_TIMEOUT", "RELAY_LINGER"} <= read  # the parse
    sampled = {name for path in SAMPLES for name in sample_settings(path)}
    assert read - STACK_PORTS - sampled == set(), "settings no sample documents"
    assert sampled - read == set(), "sample lines the code does not read"


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.parent.name)
def test_a_sample_holds_the_defaults(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "Every variable has this working local default": loading the sample changes nothing.
    for name in names_read_by_config() | OUTSIDE_CONFIG:
        monkeypatch.delenv(name, raising=False)
    defaults = dataclasses.asdict(Config())
    settings = sample_settings(path)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    assert dataclasses.asdict(Config()) == defaults
    assert settings.get("ACCESS_LOG", "") == ""


def test_the_readme_table_names_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") : readme.index("## Events")]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert (names_read_by_config() | OUTSIDE_CONFIG) - documented == set()
