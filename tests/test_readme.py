"""The README documents what exists: every config key and every CLI command."""

from pathlib import Path

from pydantic import BaseModel

from fpc_ray.cli import app
from fpc_ray.config import Config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _leaf_keys(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_keys(ann, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_config_key_is_in_the_readme():
    missing = [k for k in _leaf_keys(Config) if f"`{k}`" not in README]
    assert not missing, missing


def test_every_command_is_in_the_readme():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert names and all(f"fpc-ray {n}" in README for n in names)


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    command = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest"
    assert command in README and command in ci
