"""infra/: the cluster-launcher YAML against Ray's own schema, and agreement between the KubeRay
manifests, the node image, the entry points and pyproject.toml."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

from alexnet.config import PreprocessConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
ENTRY_CONFIGS = {"pipelines/preprocess.py": PreprocessConfig, "pipelines/train.py": TrainConfig}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(package: str) -> str:
    (dep,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(rf"{package}(\[|==)", d)]
    return dep.split("==")[1]


def _image() -> str:
    return f"ghcr.io/your-org/alexnet-ray:{PYPROJECT['project']['version']}"


def _dockerfile() -> dict[str, str]:
    text = (INFRA / "Dockerfile").read_text()
    return {"from": re.search(r"^FROM (\S+)", text, re.M).group(1),
            "workdir": re.search(r"^WORKDIR (\S+)", text, re.M).group(1), "text": text}


def _cluster_yaml() -> dict:
    return yaml.safe_load((INFRA / "cluster.yaml").read_text())


def _manifests() -> list[dict]:
    return [doc for path in sorted((INFRA / "kuberay").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _of_kind(kind: str) -> list[dict]:
    return [d for d in _manifests() if d["kind"] == kind]


# ------------------------------------------------------------- cluster launcher


def validate_cluster_yaml(config: dict) -> None:
    """What `ray up` checks a cluster YAML against: the ray-schema.json that Ray's autoscaler package ships."""
    schema = json.loads(files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_cluster_yaml_passes_rays_schema_as_ray_up_checks_it():
    validate_cluster_yaml(_cluster_yaml())


@pytest.mark.parametrize("breakage", ["fractional GPUs", "unknown node field", "negative CPUs"])
def test_broken_cluster_yaml_is_rejected_by_rays_schema(breakage):
    config = copy.deepcopy(_cluster_yaml())
    gpu = config["available_node_types"]["gpu"]
    if breakage == "fractional GPUs":
        gpu["resources"]["GPU"] = 1.5
    elif breakage == "unknown node field":
        gpu["gpus_per_worker"] = 2
    else:
        gpu["resources"]["CPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        validate_cluster_yaml(config)


def test_cluster_yaml_gpu_nodes_hold_whole_two_gpu_workers_and_run_the_project_image():
    config = _cluster_yaml()
    types = config["available_node_types"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU node type"
    for t in gpu_types:
        assert t["resources"]["GPU"] % 2 == 0
        # two-tower workers and their decoding need CPUs on the same node
        assert t["resources"]["CPU"] >= t["resources"]["GPU"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert config["docker"]["image"] == _image()
    assert any("-v /mnt/shared:/mnt/shared" in o for o in config["docker"]["run_options"])
    assert any("/mnt/shared" in c for c in config["initialization_commands"])


# ------------------------------------------------------------- image


def test_dockerfile_matches_pyproject():
    docker = _dockerfile()
    python = re.match(r"python:(\d+\.\d+\.\d+)-", docker["from"])
    assert python, f"pin the base image's Python patch version: {docker['from']}"
    assert python.group(1) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    # the image installs the project itself, so its pins are pyproject.toml's (no second list to drift)
    assert "pip install '.[server]'" in docker["text"]
    assert not re.search(r"(ray|torch|mlflow)[\[=<>]", docker["text"].split("FROM", 1)[1].replace("'.[server]'", ""))
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (\S+)", docker["text"], re.M):
        assert f"!{copied}" in ignore or f"!{copied}/" in ignore, copied


# ------------------------------------------------------------- KubeRay


def test_raycluster_versions_images_and_gpu_groups_agree():
    (cluster,) = _of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == _pin("ray") == ray.__version__
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    (pvc,) = _of_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert c["image"] == _image()
            assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
        assert claims["shared"] == pvc["metadata"]["name"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == 2
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def _entrypoints() -> list[tuple[dict, str, list[str]]]:
    """(RayJob, script path relative to the repository, arguments) of every RayJob."""
    workdir = _dockerfile()["workdir"].rstrip("/") + "/"
    out = []
    for job in _of_kind("RayJob"):
        python, script, *args = shlex.split(job["spec"]["entrypoint"])
        assert python == "python" and script.startswith(workdir), job["spec"]["entrypoint"]
        out.append((job, script.removeprefix(workdir), args))
    return out


def test_rayjobs_run_existing_entry_points_with_valid_arguments_on_the_raycluster():
    (cluster,) = _of_kind("RayCluster")
    jobs = _entrypoints()
    assert {script for _, script, _ in jobs} == set(ENTRY_CONFIGS)
    for job, script, args in jobs:
        assert (ROOT / script).is_file()
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == _image()
        cfg = ENTRY_CONFIGS[script].parse_args(args)  # argparse exits on an unknown or malformed flag
        assert str(cfg.tracking_uri).startswith("http://mlflow:5000")
        for value in (getattr(cfg, name) for name in ("input", "output", "data", "storage_path")
                      if hasattr(cfg, name)):
            assert str(value).startswith("/mnt/shared/")


def test_train_job_gpus_per_worker_matches_the_gpu_group():
    (cluster,) = _of_kind("RayCluster")
    (gpu_group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    (cfg,) = [TrainConfig.parse_args(args) for _, script, args in _entrypoints() if script == "pipelines/train.py"]
    assert cfg.gpus_per_worker == 2
    assert limits["nvidia.com/gpu"] % cfg.gpus_per_worker == 0
    workers_per_pod = limits["nvidia.com/gpu"] // cfg.gpus_per_worker
    assert cfg.num_workers <= gpu_group["maxReplicas"] * workers_per_pod
    assert cfg.cpus_per_worker * workers_per_pod < int(limits["cpu"])  # CPUs left for decoding


def test_mlflow_deployment_runs_the_serve_script_behind_a_cluster_only_service():
    (deploy,) = _of_kind("Deployment")
    (service,) = _of_kind("Service")
    (policy,) = _of_kind("NetworkPolicy")
    (cluster,) = _of_kind("RayCluster")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    workdir = _dockerfile()["workdir"].rstrip("/") + "/"
    assert (ROOT / container["command"][0].removeprefix(workdir)).is_file()
    assert service["spec"]["type"] == "ClusterIP" and service["metadata"]["name"] == "mlflow"
    assert service["spec"]["ports"][0]["port"] == 5000
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed == {"ray.io/cluster": cluster["metadata"]["name"]}


# ------------------------------------------------------------- MLflow server script


def test_serve_script_refuses_to_expose_the_server_without_allowed_hosts_or_auth(tmp_path):
    script = str(INFRA / "mlflow" / "serve.sh")
    # MLFLOW points at a command that fails loudly: the script must stop before starting a server
    env = {"PATH": "/usr/bin:/bin", "MLFLOW": str(tmp_path / "not-started"), "MLFLOW_HOST": "0.0.0.0"}
    out = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "MLFLOW_ALLOWED_HOSTS" in out.stderr
    out = subprocess.run([script], env=env | {"MLFLOW_ALLOWED_HOSTS": "mlflow.example.com"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "authentication" in out.stderr
    # explicit consent gets as far as starting the (here missing) server, with the host check on
    fake = tmp_path / "mlflow"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    out = subprocess.run([script], env=env | {"MLFLOW": str(fake), "MLFLOW_ALLOWED_HOSTS": "mlflow.example.com",
                                              "MLFLOW_BACKEND_STORE_URI": "postgresql://u:secret@db/m",
                                              "MLFLOW_NO_AUTH_I_AM_ON_A_PRIVATE_NETWORK": "1"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "--host 0.0.0.0" in out.stdout and "--allowed-hosts mlflow.example.com" in out.stdout
    assert "--serve-artifacts" in out.stdout
    assert "secret" not in out.stderr  # the banner names the backend's scheme only
