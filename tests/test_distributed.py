"""train_unet.py in two CPU processes (torchrun, gloo) with learned routing that leaves pool blocks unused."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

import mol_diffusion
from mol_diffusion.training.checkpointing import list_checkpoints

from helpers import REPO_ROOT, read_train_log, tiny_train_config

NUM_BLOCKS = 4

# K = 4 blocks but only S = 2 routing steps over 4 images per process, so some blocks get no
# gradient in an update: the case that plain DDP rejects. test_some_blocks_unused_per_update checks
# that this run has such updates.
CONFIG = tiny_train_config(
    train_batch_size=4, log_every_steps=1, model={"num_pool_blocks": NUM_BLOCKS, "router_mode": "learned"}
)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Three updates on two processes, a checkpoint after update 2 and the final one after update 3."""
    folder = tmp_path_factory.mktemp("distributed")
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    output_dir = folder / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port()),
        "train_unet.py", "--config", str(config_path), "--output_dir", str(output_dir),
        "--max_train_steps", "3", "--checkpointing_steps", "2",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def test_two_processes_share_each_update(two_process_run):
    records = read_train_log(two_process_run)
    assert [record["step"] for record in records] == [1, 2, 3]
    # Routes are counted on the main process: 4 images x 2 routing steps per update.
    assert all(sum(record[f"route_count/block_{k}"] for k in range(NUM_BLOCKS)) == 8 for record in records)


def test_some_blocks_unused_per_update(two_process_run):
    records = read_train_log(two_process_run)
    assert all(min(record[f"route_count/block_{k}"] for k in range(NUM_BLOCKS)) == 0 for record in records)


def test_two_processes_write_checkpoints(two_process_run):
    assert [step for step, _ in list_checkpoints(two_process_run)] == [2, 3]


def test_two_process_folder_loads_and_samples(two_process_run):
    pipeline = DiffusionPipeline.from_pretrained(two_process_run)
    pipeline.set_progress_bar_config(disable=True)

    images = pipeline(class_labels=[0, 9], num_inference_steps=2, output_type="pt").images

    assert isinstance(pipeline, mol_diffusion.MoLPipeline)
    assert images.shape == (2, 1, 8, 8)
    assert torch.isfinite(images).all()
