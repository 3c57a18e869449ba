"""infra/: the manifests parse, name one image and one Ray version, and entrypoints that exist."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

import fpc_ray

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE = f"ghcr.io/fpc-ray/fpc-ray:{fpc_ray.__version__}-ray{ray.__version__}"
IN_IMAGE = "/home/ray/fpc-ray/"  # where the Dockerfile puts the repository's jobs/ and configs/


def _documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            docs.append((path, doc))
            for name, text in (doc.get("data") or {}).items():  # ConfigMaps that carry a manifest
                if name.endswith(".yaml"):
                    docs.append((path, yaml.safe_load(text)))
    return docs


def _walk(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def test_infra_holds_every_deliverable():
    kinds = [doc.get("kind") for _, doc in _documents()]
    for kind in ("RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount"):
        assert kind in kinds, kind
    assert (INFRA / "docker" / "Dockerfile").is_file()
    launcher = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    assert launcher["provider"]["type"] == "aws" and launcher["available_node_types"]["gpu"]["min_workers"] == 0
    cpu = launcher["available_node_types"]["cpu"]  # Ray Data's decode tasks
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1


def test_raycluster_autoscales_gpu_workers_from_zero():
    (cluster,) = [doc for _, doc in _documents() if doc.get("kind") == "RayCluster"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu, cpu = groups["gpu"], groups["cpu"]  # cpu: Ray Data's decode tasks, from zero too
    assert cpu["minReplicas"] == 0 and cpu["maxReplicas"] >= 1
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert all("resources" in c for c in spec["headGroupSpec"]["template"]["spec"]["containers"])
    assert gpu["template"]["spec"]["serviceAccountName"] == "fpc-ray"


def test_every_image_and_ray_version_agrees_with_the_package():
    images = [(p, img) for p, doc in _documents() for img in _walk(doc, "image")]
    ours = [(p, img) for p, img in images if "fpc-ray" in img]
    assert ours and all(img == IMAGE for _, img in ours), ours
    ray_versions = [v for _, doc in _documents() for v in _walk(doc, "rayVersion")]
    assert ray_versions and all(v == ray.__version__ for v in ray_versions), ray_versions
    assert yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())["docker"]["image"] == IMAGE
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}\n" in dockerfile
    assert f"ARG FPC_RAY_VERSION={fpc_ray.__version__}\n" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    assert ray_pin.endswith("==" + ".".join(ray.__version__.split(".")[:2]) + ".*")
    assert project["version"] == fpc_ray.__version__


def test_no_secrets_in_manifests():
    files = [path for path in INFRA.rglob("*") if path.is_file()]
    assert len(files) >= 3, files  # the manifests, the launcher config, the Dockerfile
    for path in files:
        assert not re.search(r"AWS_SECRET_ACCESS_KEY|aws_secret|kind:\s*Secret", path.read_text()), path


def _entrypoints() -> set[str]:
    scripts = set()
    texts = [" ".join(str(e) for e in _walk(doc, "entrypoint")) for _, doc in _documents()]
    texts.append((INFRA / "aws" / "cluster.yaml").read_text())
    for text in texts:
        scripts.update(re.findall(re.escape(IN_IMAGE) + r"(jobs/[\w.]+\.py)", text))
        for config in re.findall(re.escape(IN_IMAGE) + r"(configs/[\w.-]+\.yaml)", text):
            assert (ROOT / config).is_file(), config
    return scripts


def test_entrypoints_are_named():
    assert {"jobs/train.py", "jobs/tune.py", "jobs/nightly_label.py"} <= _entrypoints()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted({"jobs/train.py", "jobs/tune.py", "jobs/nightly_label.py",
                                           "jobs/retrain.py"}))
def test_every_entrypoint_answers_help(script):
    assert script in _entrypoints() | {"jobs/retrain.py"}
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--" in done.stdout


def test_nightly_entrypoints_parse_and_the_cronjob_alerts_on_drift():
    """Every nightly_label.py command line in infra/ is one the job accepts; the CronJob's runs
    the drift check, so a drifted night fails its Job with exit 3."""
    import importlib.util
    import shlex

    spec = importlib.util.spec_from_file_location("nightly_label", ROOT / "jobs" / "nightly_label.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    found = {}
    for path, doc in _documents():
        for entry in _walk(doc, "entrypoint"):
            words = shlex.split(str(entry))
            if words[1].endswith("jobs/nightly_label.py"):
                found[path.name] = job._parser().parse_args(words[2:])
    assert found["cronjob-nightly-label.yaml"].drift
    assert "exit 3" in (INFRA / "kuberay" / "cronjob-nightly-label.yaml").read_text()
