"""The cluster configs under infra/: each is parsed by the tool that will read it, and the scripts are run.

Ray launcher YAML against the installed Ray wheel's schema (and Ray's own config checks); the runtime env through
Ray's RuntimeEnv validation with pins equal to pyproject.toml's; the KubeRay RayJob's structure and entrypoint;
the Slurm script with stub srun/scontrol/deepspeed (3 fake nodes x 4 GPUs, and a SIGTERM before the time limit);
the DeepSpeed hostfile with DeepSpeed's parser; the MLflow server script serving HTTP (with and without auth);
the Dockerfile's instructions. Closed by default: every Ray start demands a token and keeps the dashboard off the
network (a real token-mode head refuses an unauthenticated job submission), and the MLflow script refuses a
non-loopback bind without authentication.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
PREPROCESS_ENTRYPOINT = "python -m jobs.preprocess --config audioset"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name: Requirement(line) for line in project["dependencies"]}


def assert_pins_match_pyproject(lines: list[str]) -> list[Requirement]:
    """Every listed requirement is one of pyproject.toml's dependencies, with the same extras and specifier."""
    pinned = pyproject_requirements()
    requirements = [Requirement(line) for line in lines]
    for requirement in requirements:
        assert requirement.name in pinned, f"{requirement} is not a dependency in pyproject.toml"
        expected = pinned[requirement.name]
        assert (requirement.specifier, requirement.extras) == (expected.specifier, expected.extras), (
            f"{requirement} differs from pyproject.toml's {expected}"
        )
    return requirements


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_cluster_config_validates_against_the_installed_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(INFRA / "ray" / "cluster.yaml")
    jsonschema.validate(config, ray_schema())
    # What `ray up` runs before it touches the cloud: provider defaults filled in, then Ray's own checks.
    validate_config(prepare_config(copy.deepcopy(config)))

    workers = config["available_node_types"]["cpu_worker"]
    # A fixed pool: the job sizes its in-flight window from the CPUs present when it starts.
    assert workers["min_workers"] == workers["max_workers"] == config["max_workers"] > 0
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    ray_version = str(pyproject_requirements()["ray"].specifier).removeprefix("==")
    assert config["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-cpu"  # the pinned Ray, Python 3.11
    assert {".venv", ".git", "data", "runs", "mlruns"} <= set(config["rsync_exclude"])
    assert config["file_mounts"]["~/sslam"] == "."
    assert any("infra/ray/requirements.txt" in command for command in config["setup_commands"])


@pytest.mark.parametrize(
    "break_config",
    [
        lambda c: c.update(max_worker=8),  # unknown top-level key: the schema forbids additional properties
        lambda c: c.update(max_workers="8"),  # wrong type
        lambda c: c.pop("provider"),  # required
        lambda c: c["available_node_types"]["cpu_worker"].pop("node_config"),  # required per node type
        lambda c: c["available_node_types"]["head"].update(resources={"CPU": -1}),  # resources are >= 0
    ],
    ids=["unknown-key", "max-workers-string", "no-provider", "node-type-without-node-config", "negative-cpus"],
)
def test_ray_schema_rejects_broken_cluster_configs(break_config):
    config = load_yaml(INFRA / "ray" / "cluster.yaml")
    break_config(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def ray_start_commands(config: dict) -> list[str]:
    commands = [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]
    # A command line may hold several shell commands (`ulimit ...; ray start ...`).
    return [part.strip() for command in commands for part in command.split(";") if "ray start" in part]


def test_every_ray_start_demands_a_token_and_keeps_the_dashboard_on_loopback():
    config = load_yaml(INFRA / "ray" / "cluster.yaml")
    starts = ray_start_commands(config)
    assert len(starts) == 2  # head and workers
    for command in starts:
        assert command.startswith("RAY_AUTH_MODE=token ray start "), command
    (head,) = [command for command in starts if "--head" in command]
    dashboard_hosts = re.findall(r"--dashboard-host[= ](\S+)", " ".join(starts))
    assert dashboard_hosts == ["127.0.0.1"], "the dashboard is reached through `ray dashboard`'s ssh tunnel only"
    assert "--dashboard-host=127.0.0.1" in head
    # Every process in the container speaks token mode, and the token is where Ray looks by default.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not any(key.startswith("worker_") and "docker" in key for key in config), "one container setup for all"
    for node_type in config["available_node_types"].values():
        assert "docker" not in node_type, "a node type with its own docker section would drop the token env"


def test_the_token_checks_fail_on_the_old_open_config():
    config = load_yaml(INFRA / "ray" / "cluster.yaml")
    config["head_start_ray_commands"][-1] = config["head_start_ray_commands"][-1].replace(
        "RAY_AUTH_MODE=token ", "").replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
    head = next(command for command in ray_start_commands(config) if "--head" in command)
    assert not head.startswith("RAY_AUTH_MODE=token") and re.findall(r"--dashboard-host=(\S+)", head) == ["0.0.0.0"]


def test_cluster_requirements_pin_what_pyproject_pins():
    lines = [
        line.strip()
        for line in (INFRA / "ray" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    ]
    names = {requirement.name for requirement in assert_pins_match_pyproject(lines)}
    assert {"torch", "torchaudio", "ray", "pyarrow", "soundfile", "numpy", "pyyaml", "fsspec"} <= names
    assert not names & {"deepspeed", "mlflow"}, "preprocessing nodes do not train or track"


# ---------------------------------------------------------------------------------------------------------
# Runtime environment


def test_runtime_env_is_valid_for_ray_and_pins_match_pyproject():
    from ray.runtime_env import RuntimeEnv

    config = load_yaml(INFRA / "ray" / "runtime_env.yaml")
    runtime_env = RuntimeEnv(**config)  # Ray's own validation of every field
    packages = runtime_env["pip"]["packages"]
    names = {requirement.name for requirement in assert_pins_match_pyproject(packages)}
    assert {"torch", "torchaudio", "pyarrow", "soundfile", "numpy", "pyyaml", "tqdm", "fsspec"} <= names
    assert "ray" not in names, "a job must use the cluster's own Ray"
    assert config["working_dir"] == "."
    assert {".venv", ".git", "data", "runs", "mlruns"} <= set(config["excludes"])
    assert config["env_vars"]["OMP_NUM_THREADS"] == "1"


def test_runtime_env_carries_no_auth_setting():
    """The job API returns a job's runtime env to whoever lists jobs: a token there would be published, and a mode
    there would be a job-level override of what the cluster decides."""
    config = load_yaml(INFRA / "ray" / "runtime_env.yaml")
    assert not [name for name in config.get("env_vars", {}) if name.startswith("RAY_AUTH")]
    assert "RAY_AUTH" not in json.dumps(config)


def test_runtime_env_validation_can_fail():
    from ray.runtime_env import RuntimeEnv

    config = load_yaml(INFRA / "ray" / "runtime_env.yaml")
    config["pip"]["pip_options"] = ["--no-deps"]  # not a field of runtime_env['pip']
    with pytest.raises(ValueError, match="pip"):
        RuntimeEnv(**config)


# ---------------------------------------------------------------------------------------------------------
# KubeRay


def dockerfile_image_tag() -> str:
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    match = re.search(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", dockerfile)
    assert match, "the Dockerfile documents its build command"
    return match.group(1)


def test_kuberay_rayjob_runs_the_documented_preprocessing_entrypoint():
    job = load_yaml(INFRA / "kuberay" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == PREPROCESS_ENTRYPOINT
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["OMP_NUM_THREADS"] == "1"

    cluster = spec["rayClusterSpec"]
    assert f"=={cluster['rayVersion']}" == str(pyproject_requirements()["ray"].specifier)
    claim = load_yaml(INFRA / "kuberay" / "data-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        # The CRD types rayStartParams as map[string]string: a bare number is rejected by the API server.
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == dockerfile_image_tag()
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
        assert mounts == {"data": "/data"} and volumes == {"data": claim["metadata"]["name"]}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]


POD_LABEL = {"app.kubernetes.io/name": "sslam-preprocess"}


def test_kuberay_rayjob_demands_a_token_everywhere_and_exposes_nothing():
    job = load_yaml(INFRA / "kuberay" / "rayjob.yaml")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}  # the operator provisions the token (KubeRay >= 1.5.1)
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]),
                 spec["submitterPodTemplate"]]
    for template in templates:
        # Without a token from the operator, token mode makes `ray start` fail instead of starting an open cluster.
        (container,) = template["spec"]["containers"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
        assert not [e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN"], "the token comes from a Secret"
        assert template["metadata"]["labels"] == POD_LABEL  # the label the network policy admits
    assert "command" not in spec["submitterPodTemplate"]["spec"]["containers"][0], "KubeRay fills in ray job submit"
    head = cluster["headGroupSpec"]
    # No dashboard-host override (KubeRay binds the pod network: the operator and the submitter call it there);
    # nothing exposes the head Service beyond the cluster.
    assert "dashboard-host" not in head["rayStartParams"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and "enableIngress" not in head
    assert "headServiceAnnotations" not in cluster


def test_kuberay_network_policy_admits_the_jobs_own_pods_and_the_operator_only():
    policy = load_yaml(INFRA / "kuberay" / "network-policy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": POD_LABEL}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own, operator = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": POD_LABEL}}]}
    assert list(operator["from"][0]) == ["namespaceSelector"] and operator["ports"] == [{"protocol": "TCP",
                                                                                          "port": 8265}]
    assert "ipBlock" not in json.dumps(policy), "no address range outside the cluster is admitted"


def test_audioset_config_reads_and_writes_on_the_rayjob_volume():
    """The entrypoint runs `--config audioset` as it is: its paths must lie on the shared /data volume, and the
    output must be a URL, because the job refuses a plain local path on a multi-node cluster."""
    from jobs.train.config import load_config

    data = load_config("audioset", []).data
    assert data.source.audio_root.startswith("/data/")
    assert data.shards.output.startswith("file:///data/"), data.shards.output


def test_readme_documents_the_preprocessing_entrypoint():
    assert PREPROCESS_ENTRYPOINT in (REPO / "README.md").read_text()
    assert PREPROCESS_ENTRYPOINT in (INFRA / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# Docker


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (INFRA / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_installs_libsndfile_and_the_pinned_project():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11")
    runs = [argument for keyword, argument in instructions if keyword == "RUN"]
    apt = next(run for run in runs if "apt-get install" in run)
    assert "libsndfile1" in apt.split() and "wget" in apt.split()  # wget: KubeRay's probes
    assert any("pip install" in run and "-r /app/infra/ray/requirements.txt" in run for run in runs)
    assert any(re.search(r"pip install .*--no-deps \.( |$)", run) for run in runs)
    for keyword, argument in instructions:
        if keyword == "COPY":
            for source in argument.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "data", "runs", "mlruns"} <= set(ignored)


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed hostfile and Slurm


def test_hostfile_example_parses_with_deepspeeds_parser():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(INFRA / "deepspeed" / "hostfile.example"))
    assert dict(pool) == {"node-a": 8, "node-b": 8}


SBATCH = INFRA / "slurm" / "pretrain.sbatch"
FAKE_HOSTS = ["host0", "host1", "host2"]

FAKE_SRUN = """#!/usr/bin/env bash
# Fake srun: runs the command once per fake node, as a task with SLURM_NODEID set; records its options.
echo "$*" >>"$FAKE_LOG/srun"
nodes=$SLURM_JOB_NUM_NODES
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
pids=()
for ((node = 0; node < nodes; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >>"$FAKE_LOG/scontrol"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\\n' $FAKE_HOSTS; fi
"""

# Fake deepspeed runner: records its argv; with FAKE_TRAIN=1 it starts the same
# process tree as the real one (runner -> launch -> rank) and the rank "checkpoints" on SIGTERM.
FAKE_DEEPSPEED = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$FAKE_LOG/deepspeed.$SLURM_NODEID"
if [[ ${FAKE_TRAIN:-0} == 1 ]]; then
    bash "$FAKE_BIN/fake_launch" &
    wait $!
fi
"""

FAKE_LAUNCH = """#!/usr/bin/env bash
trap 'echo TERM >>"$FAKE_LOG/launch.$SLURM_NODEID"' TERM
bash "$FAKE_BIN/fake_rank" &
wait $!
"""

FAKE_RANK = """#!/usr/bin/env bash
trap 'echo checkpoint >"$FAKE_LOG/rank.$SLURM_NODEID.stopped"; exit 0' TERM
touch "$FAKE_LOG/rank.$SLURM_NODEID.started"
while true; do sleep 0.1; done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """PATH with stub srun/scontrol/deepspeed (and no real deepspeed), fake SLURM_* env for 3 nodes x 4 GPUs."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "deepspeed": FAKE_DEEPSPEED,
                       "fake_launch": FAKE_LAUNCH, "fake_rank": FAKE_RANK}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "MASTER_", "RESUME"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        TMPDIR=str(tmp_path),
        FAKE_BIN=str(bin_dir),
        FAKE_LOG=str(log_dir),
        FAKE_HOSTS=" ".join(FAKE_HOSTS),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="host[0-2]",
        SLURM_JOB_NUM_NODES="3",
        SLURM_GPUS_PER_NODE="4",
        SLURM_CPUS_PER_TASK="16",
        SLURM_SUBMIT_DIR=str(REPO),
        OUTPUT_DIR=str(tmp_path / "shared" / "run"),
        CONFIG="base_stage2",
    )
    return env, log_dir


def deepspeed_calls(log_dir: Path) -> list[list[str]]:
    return [path.read_text().splitlines() for path in sorted(log_dir.glob("deepspeed.*"))]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_sbatch_header_requests_one_task_per_node_and_an_early_sigterm():
    header = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH ")]
    options = dict(item.lstrip("-").split("=", 1) if "=" in item else (item.lstrip("-"), "") for item in header)
    assert options["ntasks-per-node"] == "1"
    assert int(options["nodes"]) >= 2 and int(options["gpus-per-node"]) >= 1
    assert re.fullmatch(r"B:TERM@\d+", options["signal"])
    assert "requeue" in options
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0


def test_sbatch_launches_one_deepspeed_per_node_without_ssh(fake_slurm, tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    env, log_dir = fake_slurm
    result = subprocess.run(["bash", str(SBATCH), "--set", "train.init_from=/shared/runs/base_stage1"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    calls = deepspeed_calls(log_dir)
    assert len(calls) == 3
    assert sorted(int(option(argv, "--node_rank")) for argv in calls) == [0, 1, 2]
    output_dir = env["OUTPUT_DIR"]
    hostfiles = set()
    for argv in calls:
        script = argv.index("jobs/pretrain.py")
        assert "--no_ssh" in argv[:script] and "--node_rank" in argv[:script]  # launcher options precede the script
        assert option(argv, "--master_addr") == "host0"
        assert option(argv, "--master_port") == str(20000 + 4242 % 10000)
        assert argv[script:] == ["jobs/pretrain.py", "--config", "base_stage2", "--set",
                                 f"train.output_dir={output_dir}", "--set", "train.init_from=/shared/runs/base_stage1"]
        hostfiles.add(option(argv, "--hostfile"))
    (hostfile,) = hostfiles
    assert Path(hostfile).read_text() == "host0 slots=4\nhost1 slots=4\nhost2 slots=4\n"
    assert dict(fetch_hostfile(hostfile)) == {"host0": 4, "host1": 4, "host2": 4}
    assert Path(hostfile).is_relative_to(output_dir)  # on the shared filesystem, where every node reads it

    srun_options = (log_dir / "srun").read_text().split()
    assert {"--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"} <= set(srun_options)
    assert (log_dir / "scontrol").read_text().splitlines() == ["show hostnames host[0-2]"]


def test_sbatch_resumes_after_a_requeue(fake_slurm):
    env, log_dir = fake_slurm
    env.update(SLURM_RESTART_COUNT="1", SLURM_GPUS_PER_NODE="h100:4", MASTER_PORT="29999")
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = deepspeed_calls(log_dir)
    assert len(calls) == 3 and all(argv[-1] == "--resume" for argv in calls)
    assert all(option(argv, "--master_port") == "29999" for argv in calls)
    assert Path(option(calls[0], "--hostfile")).read_text().count(" slots=4\n") == 3


def test_sbatch_refuses_to_start_without_a_shared_output_dir(fake_slurm):
    env, log_dir = fake_slurm
    del env["OUTPUT_DIR"]
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "OUTPUT_DIR" in result.stderr
    assert deepspeed_calls(log_dir) == []


@pytest.mark.slow
def test_sbatch_sigterm_stops_the_ranks_alone_and_requeues(fake_slurm):
    """Slurm's --signal=B:TERM reaches the batch script only: the ranks get SIGTERM (and checkpoint), the DeepSpeed
    launchers do not, the script exits 0 and requeues the job."""
    env, log_dir = fake_slurm
    env["FAKE_TRAIN"] = "1"
    batch = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(log_dir.glob("rank.*.started"))) < 3:
            assert batch.poll() is None and time.monotonic() < deadline, batch.stdout.read() if batch.poll() else ""
            time.sleep(0.05)
        batch.send_signal(signal.SIGTERM)
        out, _ = batch.communicate(timeout=45)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    assert batch.returncode == 0, out
    assert sorted(path.name for path in log_dir.glob("rank.*.stopped")) == [f"rank.{n}.stopped" for n in range(3)]
    assert list(log_dir.glob("launch.*")) == [], "a DeepSpeed launcher got SIGTERM (it would SIGKILL its ranks)"
    assert (log_dir / "scontrol").read_text().splitlines()[-1] == "requeue 4242"
    stop_step = [line for line in (log_dir / "srun").read_text().splitlines() if "--overlap" in line]
    assert len(stop_step) == 1


# Stands in for jobs/pretrain.py under the real DeepSpeed launcher: like the real job it checkpoints on SIGTERM and
# exits 0; its child stands for a data-loader worker, which must not be signalled (it would die mid-batch).
STUB_PRETRAIN = """
import os, pathlib, signal, subprocess, sys, time
log, rank = pathlib.Path(os.environ["FAKE_LOG"]), os.environ["RANK"]
worker = subprocess.Popen([sys.executable, "-c", (
    "import os, pathlib, signal, time\\n"
    "signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path(os.environ['FAKE_LOG'], 'worker.' + os.environ['RANK']"
    " + '.terminated').touch(), os._exit(0)))\\n"
    "time.sleep(600)\\n")])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
(log / f"rank.{rank}.started").write_text("\\n".join(sys.argv[1:]))
while not stop:
    time.sleep(0.05)
worker.kill()
worker.wait()
(log / f"rank.{rank}.stopped").write_text("checkpoint")
"""


@pytest.mark.slow
def test_sbatch_sigterm_reaches_the_ranks_of_the_real_deepspeed_launcher(fake_slurm, tmp_path):
    """The same stop, through DeepSpeed's own runner and launch.py (one node, 2 CPU ranks): only the ranks get
    SIGTERM, never their children, and every launcher exits 0."""
    env, log_dir = fake_slurm
    (Path(env["FAKE_BIN"]) / "deepspeed").unlink()  # the real launcher from the venv
    repo = tmp_path / "repo"
    (repo / "jobs").mkdir(parents=True)
    (repo / "jobs" / "pretrain.py").write_text(STUB_PRETRAIN)
    env.update(PATH=f"{env['FAKE_BIN']}{os.pathsep}{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", REPO_DIR=str(repo),
               FAKE_HOSTS="host0", SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    batch = subprocess.Popen(["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(log_dir.glob("rank.*.started"))) < 2:  # RANK 0 and 1
            assert batch.poll() is None and time.monotonic() < deadline, batch.stdout.read() if batch.poll() else ""
            time.sleep(0.1)
        batch.send_signal(signal.SIGTERM)
        out, _ = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    assert batch.returncode == 0, out[-3000:]
    assert sorted(path.name for path in log_dir.glob("rank.*.stopped")) == ["rank.0.stopped", "rank.1.stopped"]
    assert list(log_dir.glob("worker.*")) == [], "a rank's child process got SIGTERM"
    argv = (log_dir / "rank.1.started").read_text().splitlines()
    assert argv[:1] == ["--local_rank=1"] and argv[1:5] == ["--config", "base_stage2", "--set",
                                                             f"train.output_dir={env['OUTPUT_DIR']}"]


# ---------------------------------------------------------------------------------------------------------
# MLflow server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, user: str | None = None, password: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        # Generous: checking a basic-auth password hashes it (seconds on a loaded 2-core machine).
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def mlflow_env(port: int, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_PORT=str(port), MLFLOW_WORKERS="1", **extra)
    return env


class MLflowServer:
    """infra/mlflow/server.sh in its own process group, killed as a whole on exit."""

    def __init__(self, cwd: Path, env: dict):
        self.port = int(env["MLFLOW_PORT"])
        self.log = cwd / "server.log"
        self.process = subprocess.Popen(["bash", str(INFRA / "mlflow" / "server.sh")], cwd=cwd, env=env,
                                        stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if http_get(self.url("/health"))[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"no answer on /health in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def __enter__(self) -> "MLflowServer":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.mark.slow
def test_mlflow_server_script_serves_tracking_and_artifacts(tmp_path):
    port = free_port()
    env = mlflow_env(port, MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/store/mlflow.db",
                     MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"))
    with MLflowServer(tmp_path, env) as server:
        server.wait_healthy()
        status, body = http_get(server.url("/api/2.0/mlflow/experiments/search?max_results=10"))
        assert status == 200
        assert [e["name"] for e in json.loads(body)["experiments"]] == ["Default"]
        # Artifacts go through the server's proxy (--serve-artifacts), to the destination we gave it.
        assert json.loads(body)["experiments"][0]["artifact_location"].startswith("mlflow-artifacts:")
    assert (tmp_path / "store" / "mlflow.db").is_file() and (tmp_path / "artifacts").is_dir()


def test_mlflow_server_script_command_line_and_rendered_auth_config(tmp_path):
    """With a stub `mlflow`: the exact server flags, and the auth ini rendered with the chosen user database."""
    stub = tmp_path / "mlflow"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >"$STUB_OUT/args"\n'
                    'cp "$MLFLOW_AUTH_CONFIG_PATH" "$STUB_OUT/auth.ini"\n')
    stub.chmod(0o755)
    password = "not-a-committed-secret-42"
    env = mlflow_env(5123, MLFLOW_BIN=str(stub), STUB_OUT=str(tmp_path), MLFLOW_AUTH="1",
                     MLFLOW_AUTH_ADMIN_PASSWORD=password, MLFLOW_FLASK_SERVER_SECRET_KEY="k" * 32,
                     MLFLOW_AUTH_DATABASE_URI="postgresql://auth:pw@db.internal/mlflow_auth",
                     MLFLOW_SERVER_DIR=str(tmp_path / "srv"))
    result = subprocess.run(["bash", str(INFRA / "mlflow" / "server.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "args").read_text().splitlines() == [
        "server", "--backend-store-uri", f"sqlite:///{tmp_path}/srv/mlflow.db",
        "--artifacts-destination", f"{tmp_path}/srv/artifacts", "--serve-artifacts",
        "--host", "127.0.0.1", "--port", "5123", "--workers", "1", "--app-name", "basic-auth",
    ]
    auth = configparser.ConfigParser()
    auth.read(tmp_path / "auth.ini")
    assert auth["mlflow"]["database_uri"] == "postgresql://auth:pw@db.internal/mlflow_auth"
    assert auth["mlflow"]["admin_username"] == "admin" and "admin_password" not in auth["mlflow"]
    assert password not in (tmp_path / "auth.ini").read_text()
    committed = configparser.ConfigParser()
    committed.read(INFRA / "mlflow" / "basic_auth.ini")
    assert "admin_password" not in committed["mlflow"]


def test_mlflow_auth_refuses_to_start_without_an_admin_password(tmp_path):
    env = mlflow_env(free_port(), MLFLOW_AUTH="1", MLFLOW_FLASK_SERVER_SECRET_KEY="k" * 32)
    result = subprocess.run(["bash", str(INFRA / "mlflow" / "server.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("flask_wtf") is None,
                    reason="MLflow's basic-auth app imports Flask-WTF, which comes with the mlflow[auth] extra; "
                           "it is not installed in this environment")
def test_mlflow_server_script_with_basic_auth(tmp_path):
    port = free_port()
    password = "not-a-committed-secret-42"
    env = mlflow_env(port, MLFLOW_AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=password,
                     MLFLOW_FLASK_SERVER_SECRET_KEY="k" * 32)
    search = "/api/2.0/mlflow/experiments/search?max_results=10"
    with MLflowServer(tmp_path, env) as server:
        server.wait_healthy()
        assert http_get(server.url(search))[0] == 401
        assert http_get(server.url(search), "admin", "wrong-password-123")[0] == 401
        status, body = http_get(server.url(search), "admin", password)
        assert status == 200 and json.loads(body)["experiments"]
    # Defaults, relative to the working directory; the rendered ini holds no password and is private.
    rendered = tmp_path / "mlflow-server" / "basic_auth.ini"
    assert (tmp_path / "mlflow-server" / "mlflow.db").is_file()
    assert (tmp_path / "mlflow-server" / "basic_auth.db").is_file()
    assert password not in rendered.read_text() and rendered.stat().st_mode & 0o077 == 0


def run_server_script(tmp_path: Path, **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """server.sh with a stub `mlflow` that records its argv (and never serves)."""
    stub = tmp_path / "mlflow"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >"$STUB_OUT/args"\n')
    stub.chmod(0o755)
    env = mlflow_env(5123, MLFLOW_BIN=str(stub), STUB_OUT=str(tmp_path), MLFLOW_SERVER_DIR=str(tmp_path / "srv"),
                     **extra)
    if "SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW" not in extra:
        env.pop("SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW", None)
    result = subprocess.run(["bash", str(INFRA / "mlflow" / "server.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30)
    return result, tmp_path / "args"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "mlflow.example.org", "::"])
def test_mlflow_server_script_refuses_a_network_bind_without_auth(tmp_path, host):
    result, args = run_server_script(tmp_path, MLFLOW_HOST=host)
    assert result.returncode == 2
    assert f"refusing to serve MLFLOW_HOST={host} without authentication" in result.stderr
    assert "MLFLOW_AUTH=1" in result.stderr and "SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW=1" in result.stderr
    assert not args.exists(), "mlflow was started"


@pytest.mark.parametrize("host", [None, "127.0.0.1", "127.0.1.1", "localhost", "::1"])
def test_mlflow_server_script_serves_loopback_without_auth_and_without_warning(tmp_path, host):
    result, args = run_server_script(tmp_path, **({} if host is None else {"MLFLOW_HOST": host}))
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    lines = args.read_text().splitlines()
    assert lines[lines.index("--host") + 1] == (host or "127.0.0.1")


def test_mlflow_server_script_network_bind_with_auth_or_the_loud_opt_out(tmp_path):
    (tmp_path / "auth").mkdir()
    result, args = run_server_script(tmp_path / "auth", MLFLOW_HOST="0.0.0.0", MLFLOW_AUTH="1",
                                     MLFLOW_AUTH_ADMIN_PASSWORD="not-a-committed-secret-42",
                                     MLFLOW_FLASK_SERVER_SECRET_KEY="k" * 32)
    assert result.returncode == 0 and "WARNING" not in result.stderr, result.stderr
    lines = args.read_text().splitlines()
    assert lines[lines.index("--host") + 1] == "0.0.0.0" and lines[-2:] == ["--app-name", "basic-auth"]

    (tmp_path / "open").mkdir()
    result, args = run_server_script(tmp_path / "open", MLFLOW_HOST="0.0.0.0", SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW="1")
    assert result.returncode == 0, result.stderr
    assert "WARNING: serving MLFLOW_HOST=0.0.0.0 WITHOUT AUTHENTICATION" in result.stderr
    lines = args.read_text().splitlines()
    assert lines[lines.index("--host") + 1] == "0.0.0.0" and "--app-name" not in lines

    (tmp_path / "other").mkdir()  # only the exact value 1 opts out
    result, _ = run_server_script(tmp_path / "other", MLFLOW_HOST="0.0.0.0", SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW="yes")
    assert result.returncode == 2


# ---------------------------------------------------------------------------------------------------------
# Ray token authentication, for real: a head started the way cluster.yaml starts it


def dashboard_healthy(dashboard: str) -> bool:
    try:
        return http_get(f"{dashboard}/api/gcs_healthz")[0] == 200  # health checks need no token
    except OSError:
        return False


def ray_job_submit(dashboard: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
                           "python", "-c", "print('token-job-ran')"],
                          env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_token_mode_head_refuses_an_unauthenticated_job_submission(tmp_path):
    if importlib.util.find_spec("ray._private.authentication") is None:
        pytest.skip("this Ray wheel has no token authentication (Ray >= 2.52)")
    # Ray's session folder holds AF_UNIX sockets (<= 107 bytes a path): a short one, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        run_token_mode_head_scenario(tmp_path, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_token_mode_head_scenario(tmp_path: Path, temp_dir: Path) -> None:
    home, token_file = tmp_path / "home", tmp_path / "auth_token"
    home.mkdir()
    token_file.write_text("sslam-test-token-" + "0123456789abcdef" * 2)
    base = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    base.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{base.get('PATH', '')}")
    server_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}

    # Token mode without any token: the head refuses to start rather than starting open.
    refused = subprocess.run([str(BIN / "ray"), "start", "--head", "--port=0", f"--temp-dir={temp_dir / 'refused'}"],
                             env={**base, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "no authentication token was found" in refused.stdout + refused.stderr

    gcs_port, dashboard_port = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    log = tmp_path / "head.log"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
         "--dashboard-host=127.0.0.1", "--num-cpus=1", "--include-dashboard=true", "--disable-usage-stats",
         f"--temp-dir={temp_dir / 'head'}", "--block"],
        env=server_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not dashboard_healthy(dashboard):
            assert head.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no dashboard in 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        # The job API itself: no token -> 401, a wrong one -> 403.
        assert http_get(f"{dashboard}/api/jobs/")[0] == 401
        request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError) as wrong:
            urllib.request.urlopen(request, timeout=5)
        assert wrong.value.code == 403

        # A client with the token file but not in token mode sends nothing: refused, nothing ran.
        unauthenticated = ray_job_submit(dashboard, {**base, "RAY_AUTH_TOKEN_PATH": str(token_file)})
        assert unauthenticated.returncode != 0
        assert "Missing authentication token" in unauthenticated.stderr
        assert "token-job-ran" not in unauthenticated.stdout
        wrong_token = ray_job_submit(dashboard, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 40})
        assert wrong_token.returncode != 0 and "Invalid authentication token" in wrong_token.stderr

        # The documented client setup: token mode plus the token (here a file; ~/.ray/auth_token by default).
        authenticated = ray_job_submit(dashboard, server_env)
        assert authenticated.returncode == 0, authenticated.stderr[-3000:]
        assert "token-job-ran" in authenticated.stdout and "succeeded" in authenticated.stdout + authenticated.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
