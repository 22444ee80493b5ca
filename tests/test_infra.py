"""infra/: what a user applies, checked the way they would meet it.

- The AWS cluster passes Ray's own schema and validator (no cloud credentials needed for that), the
  CloudFormation template passes cfn-lint, and every Kubernetes object passes kubernetes-validate's
  strict schemas for K8S_VERSION (all offline: the schemas ship in the packages).
- The KubeRay and MLflow manifests parse, carry the fields that matter, and point at modules, config
  files, an image tag and pins that exist in this repository.
- No credential and no all-interfaces dashboard anywhere in infra/.
- The local stack really starts, runs a `ray job submit`, serves MLflow on loopback and stops cleanly;
  every listening socket of its processes (Ray's, the job's driver and workers, MLflow, moto) is on
  loopback, and its tokens are 0600 in 0700 folders.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

from orchestrator.local_cluster import free_ports

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
VENV_BIN = Path(os.environ.get("LOCAL_STACK_VENV_BIN", ROOT / ".venv" / "bin"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# "torch==2.14.1" -> {"torch": "2.14.1"}; extras dropped: "ray[default,train,tune]==2.60.0" -> ray
PINS = {
    re.split(r"[\[=<>]", dep)[0]: dep.split("==")[1]
    for dep in PYPROJECT["project"]["dependencies"]
    if "==" in dep
}

INFRA_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
K8S_MANIFESTS = sorted([*(INFRA / "k8s").glob("*.yaml"), INFRA / "mlflow" / "k8s.yaml"])
SHELL_SCRIPTS = sorted(INFRA.rglob("*.sh"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- the AWS cluster (ray up)


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_aws_cluster_passes_rays_validator(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate.
    # The provider bootstrap after this step needs boto3 and credentials, so it is not run here.
    validate_config(prepare_config(copy.deepcopy(cluster)))

    broken = copy.deepcopy(cluster)
    broken["max_worker"] = 3  # a typo must not pass: the validator is really looking
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


def test_aws_cluster_is_secure_and_bounded(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}

    assert "InstanceMarketOptions" not in head["node_config"], "the head runs on demand"
    assert head["resources"].get("GPU", 0) == 0
    assert {w["node_config"]["InstanceType"].split(".")[0] for w in workers.values()} >= {
        "p4d",
        "p5",
        "g5",
        "g6",
    }
    for name, w in workers.items():
        assert w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert w["resources"]["GPU"] in (1, 8), name
        assert 0 <= w["min_workers"] <= w["max_workers"] <= cluster["max_workers"], name
    for name, t in types.items():
        cfg = t["node_config"]
        # S3 through the instance role; our own security group, because Ray's auto-created one
        # always adds SSH from anywhere (ray/autoscaler/_private/aws/config.py).
        assert cfg["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert cfg["SecurityGroupIds"], name
        assert cfg["MetadataOptions"]["HttpTokens"] == "required", name
    assert "security_group" not in cluster["provider"]

    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    setup = " ".join(cluster["setup_commands"])
    assert "chmod 700 ~/.ray ~/.mlflow && chmod 600 ~/.ray/auth_token ~/.mlflow/credentials" in setup
    assert "RAY_AUTH_MODE=token" in setup and "source ~/resnet.env" in head_start
    assert "source ~/resnet.env" in " ".join(cluster["worker_start_ray_commands"])
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cluster["docker"]["image"].endswith(f"/resnet-orchestrator:{VERSION}")


def test_aws_prerequisites_open_only_ssh_from_one_cidr():
    class Loader(yaml.SafeLoader):
        """CloudFormation's short tags (!Ref, !Sub, !GetAtt) read as plain values."""

    Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")
    template = yaml.load((INFRA / "aws" / "prerequisites.yaml").read_text(), Loader=Loader)
    resources = template["Resources"]
    ingress = resources["ClusterSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert ingress == [{**ingress[0], "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": "!Ref"}]
    intra = resources["IntraClusterIngress"]["Properties"]
    assert "CidrIp" not in intra and intra["SourceSecurityGroupId"] == "!Ref"
    assert "0.0.0.0" not in resources["HeadRole"]["Properties"]["RoleName"]


# ---------------------------------------------------------------- CloudFormation (cfn-lint)


def test_aws_prerequisites_pass_cfn_lint(cluster):
    from cfnlint.api import lint

    # cfn-lint's resource schemas ship in its wheel: nothing is downloaded here.
    regions = [cluster["provider"]["region"]]
    text = (INFRA / "aws" / "prerequisites.yaml").read_text()
    assert [str(m) for m in lint(text, regions=regions)] == []

    # the linter is really looking: a misspelt property of the security group is an error
    broken = text.replace("GroupDescription:", "GroupDescriptoin:", 1)
    assert broken != text
    assert any("GroupDescriptoin" in str(m) for m in lint(broken, regions=regions))


# ---------------------------------------------------------------- Kubernetes

# The schemas of this Kubernetes release (strict: unknown fields are errors) ship in the
# kubernetes-validate wheel; the manifests must be valid for it.
K8S_VERSION = "1.33.0"
CORE_KINDS = {"Deployment", "Service", "ServiceAccount", "ConfigMap", "Secret"}


def _core_objects():
    """Every Kubernetes object in infra/; KubeRay's custom resources are checked through their pod
    templates, as PodTemplates (their CRDs embed the core PodTemplateSpec)."""
    for path in K8S_MANIFESTS:
        for d in _docs(path):
            name = f"{_rel(path)}:{d['kind']}/{d['metadata']['name']}"
            if d["kind"] in ("RayCluster", "RayJob"):
                spec = d["spec"].get("rayClusterSpec", d["spec"])
                templates = {"head": spec["headGroupSpec"]["template"]}
                templates |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
                if "submitterPodTemplate" in d["spec"]:
                    templates["submitter"] = d["spec"]["submitterPodTemplate"]
                for group, template in templates.items():
                    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}}
                    yield f"{name}:{group}", {**pod, "template": template}
            else:  # any other kind must be one the schemas know
                yield name, d


CORE_OBJECTS = dict(_core_objects())


def test_every_core_kind_in_infra_is_validated():
    kinds = {d["kind"] for d in CORE_OBJECTS.values()}
    # No Secret manifest: secrets are created with kubectl (test_k8s_manifest_parses_and_exposes_nothing).
    assert kinds >= CORE_KINDS - {"Secret"} | {"PodTemplate"}, kinds


@pytest.mark.parametrize("name", CORE_OBJECTS)
def test_k8s_object_passes_the_schema(name):
    from kubernetes_validate.utils import validate

    validate(CORE_OBJECTS[name], K8S_VERSION, strict=True)


def test_the_k8s_schema_validator_is_really_looking():
    from kubernetes_validate.utils import ValidationError, validate

    (deploy,) = [d for d in CORE_OBJECTS.values() if d["kind"] == "Deployment"]
    typo = copy.deepcopy(deploy)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(ValidationError, match="imagePullPolicyy"):
        validate(typo, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(deploy)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(ValidationError, match="not of type 'integer'"):
        validate(wrong_type, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=_rel)
def test_k8s_manifest_parses_and_exposes_nothing(path):
    docs = _docs(path)
    assert docs and all({"apiVersion", "kind", "metadata"} <= d.keys() for d in docs)
    for d in docs:
        assert d["kind"] not in ("Secret", "Ingress"), "secrets are created with kubectl, not files"
        if d["kind"] == "Service":
            assert d["spec"]["type"] == "ClusterIP"
    text = path.read_text()
    for exposed in ("LoadBalancer", "NodePort", "hostNetwork", "hostPort"):
        assert exposed not in text


def _ray_specs():
    for path in (INFRA / "k8s").glob("*.yaml"):
        for d in _docs(path):
            if d["kind"] == "RayCluster":
                yield path, d, d["spec"]
            elif d["kind"] == "RayJob":
                yield path, d, d["spec"]["rayClusterSpec"]


def test_kuberay_manifests_have_the_required_fields():
    kinds = {d["kind"] for _, d, _ in _ray_specs()}
    assert kinds == {"RayCluster", "RayJob"}
    for path, doc, spec in _ray_specs():
        assert doc["apiVersion"] == "ray.io/v1", path
        assert spec["rayVersion"] == PINS["ray"]
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        groups = spec["workerGroupSpecs"]
        assert groups
        for g in groups:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            (container,) = g["template"]["spec"]["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        if doc["kind"] == "RayJob":
            assert doc["spec"]["shutdownAfterJobFinishes"] is True
            assert 0 < doc["spec"]["backoffLimit"] <= 3


def test_rayjob_entrypoint_names_a_real_module_and_config():
    (job,) = [d for _, d, _ in _ray_specs() if d["kind"] == "RayJob"]
    argv = job["spec"]["entrypoint"].split()
    assert argv[:4] == ["python", "-m", "orchestrator.run", "ensemble"]
    assert (ROOT / "orchestrator" / "run.py").is_file()
    from orchestrator.run import COMMANDS

    assert argv[3] in COMMANDS
    from orchestrator.config import find_config

    config = argv[argv.index("--config") + 1]
    assert find_config(config, "ensemble").is_file(), config  # a bundled ensemble config, found by its name


def _containers(spec: dict):
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for g in spec["workerGroupSpecs"]:
        yield from g["template"]["spec"]["containers"]


def test_ray_pods_take_settings_from_secrets_and_configmaps():
    config = {
        d["metadata"]["name"]: d for d in _docs(INFRA / "k8s" / "config.yaml") if d["kind"] == "ConfigMap"
    }
    for _, _, spec in _ray_specs():
        for c in _containers(spec):
            env = {e["name"]: e for e in c["env"]}
            pw = env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert pw == {"name": "resnet-mlflow-client", "key": "password"}
            uri = env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]
            assert uri["key"] in config[uri["name"]]["data"]
            assert "value" not in env["MLFLOW_TRACKING_USERNAME"]


def test_image_tags_and_pins_agree_with_pyproject(cluster):
    images = {cluster["docker"]["image"]}
    for _, doc, spec in _ray_specs():
        images |= {c["image"] for c in _containers(spec)}
        if doc["kind"] == "RayJob":
            images |= {c["image"] for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1, images
    assert images.pop().endswith(f"/resnet-orchestrator:{VERSION}")

    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    pinned = dict(re.findall(r'"([a-z]+)(?:\[[^\]]*\])?==([\w.]+)"', dockerfile))
    for name in ("torch", "torchvision", "ray"):
        assert pinned[name] == PINS[name], name
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", dockerfile, re.M)
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", dockerfile, re.M)
    assert "-e ." in dockerfile  # the project itself, with the rest of pyproject's pins
    # the Ray version the clusters run equals the client's
    import ray

    assert ray.__version__ == PINS["ray"]


# ---------------------------------------------------------------- the MLflow server


def test_mlflow_server_runs_with_auth_postgres_and_proxied_s3():
    script = (INFRA / "mlflow" / "start-server.sh").read_text()
    for flag in ("--artifacts-destination", "--serve-artifacts", "--app-name basic-auth", "--allowed-hosts"):
        assert flag in script
    (deploy,) = [d for d in _docs(INFRA / "mlflow" / "k8s.yaml") if d["kind"] == "Deployment"]
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert "configMapKeyRef" in env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]
    (cm,) = [d for d in _docs(INFRA / "mlflow" / "k8s.yaml") if d["kind"] == "ConfigMap"]
    assert cm["data"]["artifacts-destination"].startswith("s3://")
    example = (INFRA / "mlflow" / "mlflow.env.example").read_text()
    assert "MLFLOW_BACKEND_STORE_URI=postgresql://" in example

    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    for name, svc in compose["services"].items():
        assert "ports" not in svc, name  # host network, bound to loopback: nothing published
        assert svc["network_mode"] == "host" and svc["env_file"] == "mlflow.env", name
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_BIND_HOST"] == "127.0.0.1"
    assert "listen_addresses=127.0.0.1" in compose["services"]["postgres"]["command"]


# ---------------------------------------------------------------- no secrets, nothing exposed

PLACEHOLDER = re.compile(r"^[\"']?(\$|<)|REPLACE_ME|YOUR|PLACEHOLDER|DUMMY|CHANGE_?ME|PASSWORD|EXAMPLE", re.I)
SECRET_PATTERNS = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
]
# key = value pairs whose value must be a placeholder or a reference
ASSIGNED = re.compile(
    r"(?i)(?<![a-z])(aws_secret_access_key|aws_session_token|password|passwd|secret[_-]?key|api[_-]?key)"
    r"[\"']?\s*[:=]\s*(?P<value>[^\s,;}]+)"
)
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:(?P<value>[^@\s/]+)@")
EXPOSED = re.compile(r"--dashboard-host[= ]+0\.0\.0\.0|--host[= ]+0\.0\.0\.0|0\.0\.0\.0")


def find_secrets(text: str) -> list[str]:
    found = [name for name, pattern in SECRET_PATTERNS if pattern.search(text)]
    for pattern in (ASSIGNED, URL_CREDENTIALS):
        for m in pattern.finditer(text):
            value = m.group("value").replace("\\", "")  # an escaped \"\$(...) is still a reference
            if re.search(r"[A-Za-z0-9]{3}", value) and not PLACEHOLDER.search(value):
                found.append(m.group(0))
    return found


def test_the_scanner_catches_what_it_should():
    assert find_secrets("aws_access_key_id = AKIAABCDEFGHIJKLMNOP")
    assert find_secrets("aws_secret_access_key = wJalrXUtnFEMIK7MDENGbPxRfiCY")
    assert find_secrets("  password: hunter22")
    assert find_secrets("postgresql://mlflow:s3cr3t@db:5432/mlflow")
    assert find_secrets("-----BEGIN OPENSSH PRIVATE KEY-----")
    for fine in (
        "password: REPLACE_ME",
        'MLFLOW_TRACKING_PASSWORD="$(cat f)"',
        "postgresql://u:DB_PASSWORD@h/db",
        "password = <the password you gave>",
        "AWS_SECRET_ACCESS_KEY=local-stack-dummy",
    ):
        assert not find_secrets(fine), fine
    assert EXPOSED.search("ray start --head --dashboard-host=0.0.0.0")
    assert EXPOSED.search("mlflow server --host 0.0.0.0")


@pytest.mark.parametrize("path", INFRA_FILES, ids=_rel)
def test_no_credentials_in_infra(path):
    assert not find_secrets(path.read_text()), _rel(path)


@pytest.mark.parametrize("path", INFRA_FILES, ids=_rel)
def test_nothing_listens_on_all_interfaces(path):
    text = path.read_text()
    assert not re.search(r"--dashboard-host[= ]+0\.0\.0\.0", text)
    if path in K8S_MANIFESTS:
        # Inside a pod, the bind address is not the exposure: the Service type is, and
        # test_k8s_manifest_parses_and_exposes_nothing holds every Service to ClusterIP.
        return
    assert not EXPOSED.search(text), _rel(path)


# ---------------------------------------------------------------- shell scripts


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=_rel)
def test_shell_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", "-P", str(ROOT), str(path)], check=True, cwd=ROOT)


# ---------------------------------------------------------------- the local stack, for real


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _session_alive(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if int(line.split()[1]) == sid]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback  # gRPC binds "::ffff:127.0.0.1"


def _listening_sockets(sids) -> list[tuple[str, str, int]]:
    """(process, ip, port) of every listening TCP socket of the processes in these sessions and of
    their descendants (a Ray job's driver runs in a session of its own, under the JobSupervisor)."""
    import psutil

    procs = set()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sids:
                procs |= {p, *p.children(recursive=True)}
        except (psutil.Error, ProcessLookupError):
            pass
    found = set()
    for p in procs:
        try:
            for c in p.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return sorted(found)


def _private(path: Path) -> list[str]:
    """Everything under path that another user could read: folders must be 0700, files 0600."""
    bad = []
    for p in [path, *path.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            bad.append(f"{p.relative_to(path.parent)} {mode:o}")
    return bad


def _stack_env(env_file: Path) -> dict[str, str]:
    """The environment a user gets from `source .local-stack/env.sh`."""
    out = subprocess.run(
        ["bash", "-c", f"source {env_file} && env -0"], capture_output=True, text=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_local_stack_runs_a_job_and_stops_cleanly(tmp_path):
    names = ("RAY", "DASHBOARD", "RAY_CLIENT", "DASHBOARD_AGENT", "MLFLOW", "S3")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    state = tmp_path / "stack"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))},
        **{f"LOCAL_STACK_{name}_PORT": str(port) for name, port in ports.items()},
        "LOCAL_STACK_DIR": str(state),
    }
    up = [str(INFRA / "local" / "up.sh")]
    down = [str(INFRA / "local" / "down.sh"), "--purge"]
    try:
        subprocess.run(up, env=env, check=True, capture_output=True, text=True, timeout=600)
        pids = {p.name: int(p.read_text()) for p in (state / "pids").iterdir()}
        assert set(pids) == {"ray", "mlflow", "s3"}
        again = subprocess.run(up, env=env, check=True, capture_output=True, text=True, timeout=120)
        assert "local stack is up" in again.stdout  # idempotent: the same processes stay
        assert {p.name: int(p.read_text()) for p in (state / "pids").iterdir()} == pids
        # tokens 0600 in 0700 folders: the whole state folder, and the folder around Ray's temp dir
        # (Ray makes its own temp dir 0777, so its parent is what keeps others out)
        assert _private(state) == []
        assert (state / "ray" / "auth_token").stat().st_mode & 0o777 == 0o600
        ray_tmp = Path(f"/tmp/ray-stack-{os.getuid()}-{ports['RAY']}")
        assert ray_tmp.stat().st_mode & 0o777 == 0o700

        user = {**env, **_stack_env(state / "env.sh")}
        assert user["RAY_ADDRESS"] == f"http://127.0.0.1:{ports['DASHBOARD']}"
        assert user["RAY_AUTH_MODE"] == "token"
        mlflow = user["MLFLOW_TRACKING_URI"]
        assert mlflow == f"http://127.0.0.1:{ports['MLFLOW']}"

        # a tiny job through the job API, as in infra/README.md: it sees the stack's MLflow, and with
        # no --working-dir it runs where the head was started (the image's WORKDIR on a cluster),
        # so the project's module and relative config paths resolve, as the RayJob entrypoint needs
        # it then waits (up to 3 min) for a file, so its driver and a worker are alive while the
        # test lists the cluster's listening sockets
        release = tmp_path / "release"
        probe = (
            "import os, time, ray; ray.init(); print('CPUS', ray.cluster_resources()['CPU']);"
            " print('MLFLOW', os.environ['MLFLOW_TRACKING_URI']); print('CWD', os.getcwd());"
            " import subprocess; subprocess.run(['python', '-m', 'orchestrator.run', '--help'], check=True);"
            " print('TASK', ray.get(ray.remote(lambda: os.getpid()).remote()), flush=True);"
            f" t = time.time() + 180\nwhile not os.path.exists({str(release)!r}) and time.time() < t: time.sleep(0.2)"
        )
        # --no-wait and poll: on a loaded machine the CLI's log stream may close before the job ends
        ray = str(VENV_BIN / "ray")
        run = dict(env=user, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        subprocess.run([ray, "job", "submit", "--no-wait", "--submission-id", "probe", "--", "python", "-c", probe],
                       check=True, **run)  # fmt: skip
        deadline = time.monotonic() + 300
        finished = r"Job 'probe' (succeeded|failed|was stopped)"
        while time.monotonic() < deadline:  # until the probe's task has run (or the job has ended)
            if "TASK" in subprocess.run([ray, "job", "logs", "probe"], **run).stdout:
                break
            out = subprocess.run([ray, "job", "status", "probe"], **run)
            assert not re.search(finished, out.stdout + out.stderr), out.stdout + out.stderr
            time.sleep(2)
        # Loopback only: every listening socket of the stack (Ray's GCS, raylet, agents, client
        # server, metrics, the job's driver and workers; MLflow; moto) is on 127.0.0.1.
        listening = _listening_sockets(set(pids.values()))
        exposed = [s for s in listening if not _is_loopback(s[1])]
        assert exposed == [], exposed
        open_ports = {port for _, _, port in listening}
        assert {
            ports["RAY"],
            ports["DASHBOARD"],
            ports["DASHBOARD_AGENT"],
            ports["MLFLOW"],
            ports["S3"],
        } <= open_ports
        assert {"gcs_server", "raylet"} <= {name for name, _, _ in listening}
        assert len({name for name, _, _ in listening if name.startswith("ray::")}) >= 3, listening
        release.touch()
        while time.monotonic() < deadline:
            out = subprocess.run([ray, "job", "status", "probe"], **run)
            status = out.stdout + out.stderr
            if re.search(finished, status):
                break
            time.sleep(2)
        job = subprocess.run([ray, "job", "logs", "probe"], check=True, **run)
        assert "Job 'probe' succeeded" in status, status + job.stdout
        assert "CPUS " in job.stdout and f"MLFLOW {mlflow}" in job.stdout
        assert f"CWD {ROOT}" in job.stdout
        assert "usage: python -m orchestrator.run" in job.stdout

        # the dashboard's job API refuses a client without the token
        no_token = {k: v for k, v in user.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
        no_token["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
        refused = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "list"], env=no_token, capture_output=True, timeout=60
        )
        assert refused.returncode != 0

        # MLflow answers on loopback, with authentication when mlflow[auth] is installed
        assert _get(f"{mlflow}/health") == 200
        search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
        if "MLFLOW_TRACKING_PASSWORD" in user:
            assert _get(search) == 401
            assert _get(search, ("admin", user["MLFLOW_TRACKING_PASSWORD"])) == 200
        else:
            assert _get(search) == 200
    finally:
        stopped = subprocess.run(down, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for name, sid in pids.items():
        assert not _session_alive(sid), f"{name} left processes behind"
    for name, port in ports.items():
        assert not _port_open(port), f"{name} port {port} still open"
    gone = subprocess.run([str(VENV_BIN / "ray"), "job", "list"], env=user, capture_output=True, timeout=60)
    assert gone.returncode != 0
    # `ray status` fails too (it would retry for ~35 s by default; 3 s is plenty on loopback)
    status = subprocess.run(
        [str(VENV_BIN / "ray"), "status", "--address", f"127.0.0.1:{ports['RAY']}"],
        env={**user, "RAY_py_gcs_connect_timeout_s": "3"}, capture_output=True, timeout=120,
    )  # fmt: skip
    assert status.returncode != 0
    assert not state.exists()
