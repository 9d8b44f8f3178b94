"""The launch scripts: shell-clean, and the SLURM trainer script expands its settings on the nodes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


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
