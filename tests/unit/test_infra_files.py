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


def _env(container: dict) -> dict[str, object]:
    """A container's env as name -> literal value, or ("secret", name, key) for a secretKeyRef."""
    out: dict[str, object] = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        out[e["name"]] = ("secret", ref["name"], ref["key"]) if ref else e.get("value")
    return out


def _policy_for(labels: dict) -> dict:
    (policy,) = [p for p in _of_kind("NetworkPolicy")
                 if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
                 and p["spec"]["podSelector"]["matchLabels"]]
    return policy


def _admits(policy: dict, labels: dict, port: int) -> bool:
    """Whether `policy` lets a pod with `labels` open `port` on the pods it selects."""
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = [f["podSelector"]["matchLabels"] for f in rule["from"]]
        if (not ports or port in ports) and any(s.items() <= labels.items() for s in sources):
            return True
    return False


def test_every_ray_container_and_submitter_uses_the_same_token_from_a_secret():
    (cluster,) = _of_kind("RayCluster")
    spec = cluster["spec"]
    containers = [c for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
                  for c in pod["spec"]["containers"]]
    containers += [c for job in _of_kind("RayJob") for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    tokens = set()
    for c in containers:
        env = _env(c)
        assert env.get("RAY_AUTH_MODE") == "token", c["name"]
        assert isinstance(env.get("RAY_AUTH_TOKEN"), tuple), f"{c['name']}: the token must come from a Secret"
        tokens.add(env["RAY_AUTH_TOKEN"])
    assert len(tokens) == 1 and len(containers) == 5  # head, 2 worker groups, 2 submitters


def test_the_head_admits_only_its_own_cluster_and_the_rayjob_submitters():
    (cluster,) = _of_kind("RayCluster")
    name = cluster["metadata"]["name"]
    head = {"ray.io/cluster": name, "ray.io/node-type": "head"}  # the labels KubeRay puts on the head pod
    worker = {"ray.io/cluster": name, "ray.io/node-type": "worker", "ray.io/group": "gpu"}
    policy = _policy_for(head)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for port in (6379, 8265, 10001):
        assert _admits(policy, worker, port)
        assert not _admits(policy, {"app": "some-other-app"}, port)
    submitters = [job["spec"]["submitterPodTemplate"]["metadata"]["labels"] for job in _of_kind("RayJob")]
    assert len(submitters) == 2
    for labels in submitters:
        assert _admits(policy, labels, 8265)  # the Jobs API, where KubeRay's submitter sends the job
        assert not _admits(policy, labels, 6379)
    assert _admits(_policy_for(worker), head, 8076) and not _admits(_policy_for(worker), {"app": "x"}, 8076)


def test_mlflow_runs_the_serve_script_with_basic_auth_from_secrets_reached_by_the_drivers_only():
    (deploy,) = _of_kind("Deployment")
    (service,) = _of_kind("Service")
    (cluster,) = _of_kind("RayCluster")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    workdir = _dockerfile()["workdir"].rstrip("/") + "/"
    assert (ROOT / container["command"][0].removeprefix(workdir)).is_file()
    assert service["spec"]["type"] == "ClusterIP" and service["metadata"]["name"] == "mlflow"
    assert service["spec"]["ports"][0]["port"] == 5000
    env = _env(container)
    assert env["MLFLOW_AUTH"] == "basic" and "MLFLOW_NO_AUTH_I_AM_ON_A_PRIVATE_NETWORK" not in env
    for secret in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert isinstance(env[secret], tuple), secret
    assert not any("args" in c for c in deploy["spec"]["template"]["spec"]["containers"])
    # the drivers run on the head and log in with the password the server was given
    head = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head_env = _env(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert head_env["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    policy = _policy_for(deploy["spec"]["template"]["metadata"]["labels"])
    assert _admits(policy, head, 5000)
    assert not _admits(policy, {**head, "ray.io/node-type": "worker"}, 5000)


def test_the_launcher_turns_on_token_auth_on_every_node():
    config = _cluster_yaml()
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]  # every process of every container
    assert "~/.ray/auth_token" in config["file_mounts"]  # the same token on every node
    assert not any("dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])


def test_no_recipe_puts_a_password_on_a_command_line():
    """README and infra recipes: credentials come from files or secrets, never `user:password@` in a command."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", *INFRA.rglob("*.md"), *INFRA.rglob("*.yaml"),
                                        *INFRA.rglob("*.sh")]}
    for path, text in texts.items():
        found = re.findall(r"[a-z+]+://[^\s:/@'\"]+:[^\s@'\"]+@", text)
        assert not [f for f in found if "..." not in f], (path, found)


# ------------------------------------------------------------- MLflow server script


def _serve(tmp_path, **env) -> subprocess.CompletedProcess:
    """serve.sh with MLFLOW pointing at a stand-in that prints the argv and environment it was given."""
    fake = tmp_path / "mlflow"
    fake.write_text('#!/bin/sh\necho "ARGV $@"\nenv\n')
    fake.chmod(0o755)
    return subprocess.run([str(INFRA / "mlflow" / "serve.sh")], env={"PATH": "/usr/bin:/bin", "MLFLOW": str(fake), **env},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.example.com", "localhost", "127.0.0.1.nip.io", "10.0.0.5"])
def test_serve_script_refuses_to_expose_the_server_without_allowed_hosts_or_auth(tmp_path, host):
    """Only IP literals of the loopback range count as loopback: a name resolves to whatever DNS says."""
    out = _serve(tmp_path, MLFLOW_HOST=host)
    assert out.returncode == 2 and "MLFLOW_ALLOWED_HOSTS" in out.stderr and "ARGV" not in out.stdout
    out = _serve(tmp_path, MLFLOW_HOST=host, MLFLOW_ALLOWED_HOSTS="mlflow.example.com")
    assert out.returncode == 2 and "authentication" in out.stderr and "ARGV" not in out.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1"])
def test_serve_script_binds_loopback_literals_without_further_questions(tmp_path, host):
    out = _serve(tmp_path, MLFLOW_HOST=host)
    assert out.returncode == 0, out.stderr
    assert f"--host {host} " in out.stdout and "--allowed-hosts" not in out.stdout


def test_serve_script_never_puts_the_backend_password_on_the_command_line(tmp_path):
    out = _serve(tmp_path, MLFLOW_HOST="0.0.0.0", MLFLOW_ALLOWED_HOSTS="mlflow.example.com",
                 MLFLOW_NO_AUTH_I_AM_ON_A_PRIVATE_NETWORK="1",
                 MLFLOW_BACKEND_STORE_URI="postgresql://u:s3cret@db/m", MLFLOW_ARTIFACTS_DESTINATION="s3://b/m")
    assert out.returncode == 0, out.stderr
    (argv,) = [line for line in out.stdout.splitlines() if line.startswith("ARGV ")]
    assert "--host 0.0.0.0" in argv and "--allowed-hosts mlflow.example.com" in argv and "--serve-artifacts" in argv
    assert "s3cret" not in argv and "s3cret" not in out.stderr  # the banner names the backend's scheme only
    # `mlflow server` takes both from its environment (click envvar), where `ps` does not show them
    environ = dict(line.split("=", 1) for line in out.stdout.splitlines()[1:] if "=" in line)
    assert environ["MLFLOW_BACKEND_STORE_URI"] == "postgresql://u:s3cret@db/m"
    assert environ["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://b/m"


@pytest.mark.parametrize("password, key, ok", [(None, "k" * 32, False), ("password1234", "k" * 32, False),
                                               ("", "k" * 32, False), ("a-long-random-one", None, False),
                                               ("a-long-random-one", "k" * 32, True)])
def test_serve_script_basic_auth_starts_only_with_an_admin_password_of_its_own(tmp_path, password, key, ok):
    env = ({"MLFLOW_AUTH": "basic"} | ({} if password is None else {"MLFLOW_AUTH_ADMIN_PASSWORD": password})
           | ({} if key is None else {"MLFLOW_FLASK_SERVER_SECRET_KEY": key}))
    out = _serve(tmp_path, **env)
    assert (out.returncode == 0) == ok, out.stderr
    if ok:
        assert "--app-name basic-auth" in out.stdout and password not in out.stdout.splitlines()[0]
        environ = dict(line.split("=", 1) for line in out.stdout.splitlines()[1:] if "=" in line)
        conf = Path(environ["MLFLOW_AUTH_CONFIG_PATH"])  # the user store's URI: readable by this user only
        assert conf.stat().st_mode & 0o077 == 0 and conf.parent.stat().st_mode & 0o077 == 0
        assert "database_uri = sqlite:///basic_auth.db" in conf.read_text() and password not in conf.read_text()
    else:
        missing = "MLFLOW_FLASK_SERVER_SECRET_KEY" if key is None else "MLFLOW_AUTH_ADMIN_PASSWORD"
        assert out.returncode == 2 and missing in out.stderr and "ARGV" not in out.stdout
