"""The container image and the cluster configs agree with the package (no Docker daemon needed).

What a cluster user runs cannot be built here, so this checks what would break it silently: the
configs must parse, name the Dockerfile's image on every node (not a placeholder repository to
`pip install` from), and the Dockerfile must copy files that exist and install extras the package
declares.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "ray-extsrc:0.1.0"


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _images(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image"] + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay-raycluster.yaml"])
def test_every_node_runs_the_packaged_image_and_installs_nothing_at_start(name):
    text = (ROOT / "cluster" / name).read_text()
    config = yaml.safe_load(text)
    images = _images(config)
    assert images and all(i == IMAGE for i in images), images
    assert "YOUR_ORG" not in text and "pip install" not in text


def test_kuberay_gives_every_pod_a_memory_backed_dev_shm():
    config = yaml.safe_load((ROOT / "cluster" / "kuberay-raycluster.yaml").read_text())
    groups = [config["spec"]["headGroupSpec"], *config["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_dockerfile_copies_what_exists_and_installs_declared_extras():
    text = _dockerfile()
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    default_gpu = re.search(r"^ARG GPU_EXTRA=(\S+)", text, re.M).group(1)
    installed = re.search(r'pip install [^"]*"\.\[([^\]]+)\]"', text).group(1)
    names = {default_gpu if n == "${GPU_EXTRA}" else n for n in installed.split(",")}
    assert {"gpu", "train", "remote"} <= names <= extras
    assert "gpu-cu13" in extras  # the documented --build-arg GPU_EXTRA=gpu-cu13
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:\S+-gpu$", text, re.M)


def test_dockerignore_keeps_the_context_small_but_not_the_package_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    assert not {"ray_extsrc", "pyproject.toml", "README.md", "examples"} & set(ignored)
