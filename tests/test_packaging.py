"""Packaging: pins in pyproject.toml and envs/*.yaml agree; the set-up commands are documented."""

from __future__ import annotations

import re
import tomllib

import yaml
from conftest import REPO


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    pins = {}
    for dep in deps:
        name, _, version = dep.partition("==")
        assert version, f"pyproject dependency {dep!r} is not pinned with =="
        pins[name.strip().lower()] = version.strip()
    return pins


def test_every_conda_env_repeats_the_pyproject_pins():
    pins = _pyproject_pins()
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
        env_pins = {}
        for dep in pip:
            name, _, version = dep.partition("==")
            env_pins[name.strip().lower()] = version.strip()
        assert env_pins == pins, f"{env.name} differs from pyproject.toml: {set(env_pins.items()) ^ set(pins.items())}"
        assert "python=3.11" in spec["dependencies"]


def test_rules_use_an_env_that_exists():
    for smk in (REPO / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert (REPO / "rules" / env).resolve().exists(), f"{smk.name}: {env}"


def test_readme_and_ci_give_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
