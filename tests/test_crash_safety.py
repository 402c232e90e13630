"""Crash safety of train_unet.py: SIGKILL, half-written checkpoints, exact resume and safe checkpoint loading.

The end-to-end tests run train_unet.py as a subprocess on builtin:digits at 8x8 with a tiny model.
The uninterrupted reference run saves no checkpoint before its last step, so the tests also show
that saving a checkpoint does not change the training that follows it.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, DiffusionPipeline
from safetensors.torch import load_file

from mol_diffusion import MoLPipeline, MoLTransformer2DModel
from mol_diffusion.training import ConfigError
from mol_diffusion.training import checkpointing
from mol_diffusion.training.checkpointing import (
    DataPosition,
    EpochSeededDataset,
    list_checkpoints,
    read_data_position,
    remove_unfinished_saves,
    restore_rng_state,
    save_pipeline_atomically,
    save_rng_state,
)

from helpers import REPO_ROOT, read_train_log, run_training, tiny_train_config, training_command

# builtin:digits has 1437 training images: 22 batches of 64 per epoch, so 30 updates cross an epoch.
MAX_STEPS = 30
CONFIG = tiny_train_config(
    train_batch_size=64,
    random_flip=True,  # augmentations draw random numbers, which a resume must reproduce
    lr_warmup_steps=5,
    use_ema=True,
    log_every_steps=0,
    model={"router_noise": "gumbel"},  # routing noise draws from the global RNG during training
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def logged_steps(output_dir):
    path = Path(output_dir) / "train_log.jsonl"
    return [record["step"] for record in read_train_log(output_dir)] if path.exists() else []


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "crash.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def start_training(config_path, output_dir, stderr_path, *flags):
    """Start train_unet.py in the background; stderr goes to a file, since a full pipe would block it."""
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen(
            training_command(config_path, output_dir, *flags), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr
        )


def kill_after_checkpoints(process, output_dir, num_checkpoints):
    """SIGKILL `process` once `num_checkpoints` checkpoints exist and an update after the newest is logged."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        checkpoints = list_checkpoints(str(output_dir))
        if len(checkpoints) >= num_checkpoints and max(logged_steps(output_dir), default=0) > checkpoints[-1][0]:
            break
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.fail(f"train_unet.py ended (exit code {process.returncode}) before it could be killed")
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def truncate_to_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def fake_half_written_checkpoint(output_dir):
    """Turn the newest checkpoint into a half-written `.tmp` folder, as a kill during its save leaves it.

    Leftovers of other interrupted saves are added too. Returns the step of the checkpoint to resume from.
    """
    (_, previous), (newest_step, newest) = list_checkpoints(str(output_dir))[-2:]
    unfinished = Path(f"{newest}.tmp")
    if unfinished.exists():  # the kill interrupted the save of that step once more
        shutil.rmtree(unfinished)
    Path(newest).rename(unfinished)
    truncate_to_half(unfinished / "optimizer.bin")
    truncate_to_half(unfinished / "transformer" / WEIGHTS)
    (output_dir / ".replaced-abc.tmp" / "old").mkdir(parents=True)
    (output_dir / ".pipeline-def.tmp").mkdir()
    return previous


@pytest.fixture(scope="module")
def runs(config_path, tmp_path_factory):
    """An uninterrupted reference run, and a run killed with SIGKILL, left with a half-written checkpoint, resumed.

    The reference runs MAX_STEPS updates without checkpoints before the last step. The other run
    saves a checkpoint after every update and keeps 3. It is killed once it has 2 checkpoints and
    has logged an update after them. Its newest checkpoint is then made half-written, and the run
    resumes with `--resume_from_checkpoint latest` up to MAX_STEPS.
    """
    root = tmp_path_factory.mktemp("runs")
    reference_dir, killed_dir = root / "reference", root / "killed"
    reference = start_training(
        config_path, reference_dir, root / "reference.stderr",
        "--max_train_steps", str(MAX_STEPS), "--checkpointing_steps", "1000",
    )
    flags = ["--max_train_steps", str(MAX_STEPS), "--checkpointing_steps", "1", "--checkpoints_total_limit", "3"]
    killed = start_training(config_path, killed_dir, root / "killed.stderr", *flags)
    try:
        kill_after_checkpoints(killed, killed_dir, num_checkpoints=2)
        steps_before_resume = logged_steps(killed_dir)
        resume_from = fake_half_written_checkpoint(killed_dir)
        resumed = run_training(config_path, killed_dir, *flags, "--resume_from_checkpoint", "latest")
        reference.wait(timeout=300)
    finally:
        for process in (reference, killed):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert reference.returncode == 0, (root / "reference.stderr").read_text()[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return SimpleNamespace(
        reference=reference_dir,
        resumed=killed_dir,
        resumed_stderr=resumed.stderr,
        resume_from=resume_from,
        steps_before_resume=steps_before_resume,
    )


def test_killed_run_was_mid_training(runs):
    assert 0 < max(runs.steps_before_resume) < MAX_STEPS


def test_half_written_checkpoint_not_resumed(runs):
    assert f"Resuming from {runs.resume_from}" in runs.resumed_stderr


def test_resumed_log_has_every_step_once(runs):
    assert logged_steps(runs.resumed) == list(range(1, MAX_STEPS + 1))


def test_resumed_losses_match_uninterrupted(runs):
    resumed = [record["loss"] for record in read_train_log(runs.resumed)]
    reference = [record["loss"] for record in read_train_log(runs.reference)]
    assert resumed == reference


def test_resumed_learning_rates_match_uninterrupted(runs):
    resumed = [record["lr"] for record in read_train_log(runs.resumed)]
    reference = [record["lr"] for record in read_train_log(runs.reference)]
    assert resumed == reference


def test_resumed_ema_weights_match_uninterrupted(runs):
    # The saved pipeline contains the EMA weights.
    resumed = load_file(runs.resumed / "transformer" / WEIGHTS)
    reference = load_file(runs.reference / "transformer" / WEIGHTS)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_resumed_optimizer_state_matches_uninterrupted(runs):
    final_checkpoint = f"checkpoint-{MAX_STEPS}"
    resumed = torch.load(runs.resumed / final_checkpoint / "optimizer.bin", weights_only=True)["state"]
    reference = torch.load(runs.reference / final_checkpoint / "optimizer.bin", weights_only=True)["state"]
    assert resumed.keys() == reference.keys()
    for index in reference:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed[index][key], reference[index][key]), (index, key)


def test_resumed_run_keeps_checkpoint_limit(runs):
    assert [step for step, _ in list_checkpoints(str(runs.resumed))] == [MAX_STEPS - 2, MAX_STEPS - 1, MAX_STEPS]


def test_unfinished_folders_removed_after_save(runs):
    assert [name for name in os.listdir(runs.resumed) if name.endswith(".tmp")] == []


def copy_run(source, tmp_path):
    destination = tmp_path / "out"
    shutil.copytree(source, destination)
    return destination


class OpensFileWhenUnpickled:
    """Unpickling it calls open(path, "w"): a stand-in for code run by a malicious checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_interrupted_final_save_is_redone(config_path, runs, tmp_path):
    # A run killed during the final pipeline save has no model_index.json, and rerunning writes it.
    # accelerate skips a random_states file it cannot load, so pickled code there must not run either.
    output_dir = copy_run(runs.reference, tmp_path)
    (output_dir / "model_index.json").unlink()
    marker = tmp_path / "code_ran"
    torch.save(OpensFileWhenUnpickled(marker), output_dir / f"checkpoint-{MAX_STEPS}" / "random_states_0.pkl")

    result = run_training(
        config_path, output_dir, "--max_train_steps", str(MAX_STEPS), "--resume_from_checkpoint", "latest"
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert isinstance(DiffusionPipeline.from_pretrained(output_dir), MoLPipeline)
    assert logged_steps(output_dir) == list(range(1, MAX_STEPS + 1))
    assert not marker.exists()


def test_pickled_code_in_optimizer_rejected(config_path, runs, tmp_path):
    output_dir = copy_run(runs.reference, tmp_path)
    checkpoint = output_dir / f"checkpoint-{MAX_STEPS}"
    marker = tmp_path / "code_ran"
    torch.save({"state": OpensFileWhenUnpickled(marker)}, checkpoint / "optimizer.bin")

    result = run_training(
        config_path, output_dir, "--max_train_steps", str(MAX_STEPS + 1), "--resume_from_checkpoint", "latest"
    )

    assert result.returncode == 2
    assert not marker.exists()
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"train_unet.py: error: cannot load checkpoint {checkpoint}")
    assert "weights_only=True" in last_line
    assert "Traceback" not in result.stderr


# In-process checks of the helpers.


class RandomItems(torch.utils.data.Dataset):
    """Item i is a random draw from the global RNG, like a random crop or flip of image i."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(3)


def test_seeded_items_ignore_fetch_order():
    dataset = EpochSeededDataset(RandomItems(), seed=5)
    dataset.begin_epoch(2)
    forward = dataset.__getitems__(list(range(10)))
    backward = dataset.__getitems__(list(range(9, -1, -1)))[::-1]
    single = [dataset[index] for index in range(10)]
    for index in range(10):
        assert torch.equal(forward[index], backward[index])
        assert torch.equal(forward[index], single[index])


def test_seeded_items_change_with_epoch():
    dataset = EpochSeededDataset(RandomItems(), seed=5)
    dataset.begin_epoch(0)
    first = dataset[3]
    dataset.begin_epoch(1)
    assert not torch.equal(first, dataset[3])


def test_seeded_items_leave_global_rng_alone():
    dataset = EpochSeededDataset(RandomItems(), seed=5)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    dataset.__getitems__([0, 1, 2])
    assert torch.equal(torch.rand(4), expected)


def test_shuffle_order_depends_on_seed_and_epoch_only():
    def epoch_order(seed, epoch):
        dataset = EpochSeededDataset(RandomItems(), seed=seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=10, shuffle=True, generator=dataset.generator)
        dataset.begin_epoch(epoch)
        torch.rand(7)  # draws from the global RNG must not matter
        return torch.cat([batch for batch in loader])

    assert torch.equal(epoch_order(1, 4), epoch_order(1, 4))
    assert not torch.equal(epoch_order(1, 4), epoch_order(1, 5))
    assert not torch.equal(epoch_order(1, 4), epoch_order(2, 4))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(7)
    save_rng_state(str(tmp_path), process_index=0)
    expected = torch.rand(5)
    torch.rand(100)

    assert restore_rng_state(str(tmp_path), process_index=0)
    assert torch.equal(torch.rand(5), expected)


def test_truncated_rng_state_raises(tmp_path):
    save_rng_state(str(tmp_path), process_index=0)
    truncate_to_half(tmp_path / "rng_state_0.safetensors")
    with pytest.raises(ConfigError, match="rng_state_0.safetensors"):
        restore_rng_state(str(tmp_path), process_index=0)


def test_missing_data_position_is_none(tmp_path):
    assert read_data_position(str(tmp_path)) is None


def test_invalid_data_position_raises(tmp_path):
    (tmp_path / "training_state.json").write_text('{"data_seed": 0, "epoch": 1')
    with pytest.raises(ConfigError, match="training_state.json is invalid"):
        read_data_position(str(tmp_path))


def test_data_position_read_back(tmp_path):
    state = {"global_step": 9, "data_seed": 3, "epoch": 1, "batches_done": 4}
    (tmp_path / "training_state.json").write_text(json.dumps(state))
    assert read_data_position(str(tmp_path)) == DataPosition(data_seed=3, epoch=1, batches_done=4)


def test_remove_unfinished_saves_keeps_the_rest(tmp_path):
    unfinished = ["checkpoint-4.tmp", ".replaced-x1.tmp", ".pipeline-y2.tmp"]
    kept = ["checkpoint-3", "samples", "transformer", "notes.tmp"]
    for name in unfinished + kept:
        (tmp_path / name).mkdir()

    remove_unfinished_saves(str(tmp_path))

    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_prune_keeps_newest_without_leftovers(tmp_path):
    for step in range(1, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "optimizer.bin").write_bytes(b"state")

    removed = checkpointing.prune_checkpoints(str(tmp_path), total_limit=2)

    assert removed == [str(tmp_path / "checkpoint-1"), str(tmp_path / "checkpoint-2")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]


def tiny_pipeline(seed):
    torch.manual_seed(seed)
    model = MoLTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, num_attention_heads=2, attention_head_dim=8,
        num_pool_blocks=2, num_routing_steps=2, router_hidden_size=8,
    )
    return MoLPipeline(transformer=model, scheduler=DDPMScheduler(num_train_timesteps=10))


def test_interrupted_pipeline_save_does_not_load(tmp_path, monkeypatch):
    save_pipeline_atomically(tiny_pipeline(seed=0), str(tmp_path))
    replace_directory = checkpointing._replace_directory
    moves = []

    def kill_before_second_move(source, destination):
        moves.append(destination)
        if len(moves) == 2:
            raise KeyboardInterrupt("simulated kill between two component moves")
        replace_directory(source, destination)

    monkeypatch.setattr(checkpointing, "_replace_directory", kill_before_second_move)
    with pytest.raises(KeyboardInterrupt):
        save_pipeline_atomically(tiny_pipeline(seed=1), str(tmp_path))

    # The folder now mixes new and old components, so it must not load at all.
    assert len(moves) == 2
    assert not (tmp_path / "model_index.json").exists()
    with pytest.raises(OSError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path)
