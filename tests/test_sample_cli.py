"""sample.py run as a subprocess on tiny saved pipelines."""

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from mol_diffusion import MoLPipeline, MoLTransformer2DModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_SCRIPT = os.path.join(REPO_ROOT, "sample.py")
SIZE = 8
PADDING = 2  # torchvision.utils.make_grid's default, which sample.py keeps
FAST = ["--num_inference_steps", "2"]


def save_tiny_pipeline(folder, num_classes):
    torch.manual_seed(0)
    model = MoLTransformer2DModel(
        sample_size=SIZE,
        patch_size=2,
        in_channels=1,
        num_attention_heads=2,
        attention_head_dim=16,
        num_pool_blocks=2,
        num_routing_steps=3,
        num_classes=num_classes,
    )
    MoLPipeline(transformer=model, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return str(folder)


def grid_size(rows, columns):
    """Pixel (width, height) of a make_grid of SIZE x SIZE images."""
    return (columns * (SIZE + PADDING) + PADDING, rows * (SIZE + PADDING) + PADDING)


def run_sample(args):
    return subprocess.run(
        [sys.executable, SAMPLE_SCRIPT, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def sample_module():
    """sample.py imported as a module, for checks that need no new process."""
    spec = importlib.util.spec_from_file_location("sample_script", SAMPLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_cli")
    empty = root / "empty"
    empty.mkdir()
    checkpoint = root / "checkpoint-3"
    checkpoint.mkdir()
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )
    MoLPipeline(transformer=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(root / "unet")
    return {
        "root": root,
        "conditional": save_tiny_pipeline(root / "conditional", num_classes=3),
        "unconditional": save_tiny_pipeline(root / "unconditional", num_classes=None),
        "empty": str(empty),
        "checkpoint": str(checkpoint),
        "unet": str(root / "unet"),
    }


@pytest.fixture(scope="module")
def runs(folders):
    """Run every sample.py case once, a few at a time, since each start spends seconds on imports."""
    root = folders["root"]
    cases = {
        "grid": [
            "--model_dir", folders["conditional"], "--class_labels", "0,2", "--num_images", "3",
            "--guidance_scale", "2.0", "--output", str(root / "grid" / "nested" / "grid.png"), *FAST,
        ],
        "individual": [
            "--model_dir", folders["unconditional"], "--num_images", "5",
            "--output", str(root / "individual.png"), "--save_individual", str(root / "images"), *FAST,
        ],
        "missing_folder": ["--model_dir", str(root / "does_not_exist")],
        "no_model_index": ["--model_dir", folders["empty"]],
        "label_out_of_range": ["--model_dir", folders["conditional"], "--class_labels", "0,3", *FAST],
        "labels_on_unconditional": ["--model_dir", folders["unconditional"], "--class_labels", "0", *FAST],
        "checkpoint_folder": ["--model_dir", folders["checkpoint"]],
        "plot_routes_without_router": [
            "--model_dir", folders["unet"], "--plot_routes", str(root / "routes.png"), *FAST,
        ],
    }

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(run_sample, cases.values())))
    return results


def test_grid_has_one_row_per_label(runs, folders):
    result = runs["grid"]

    assert result.returncode == 0, result.stderr
    with Image.open(folders["root"] / "grid" / "nested" / "grid.png") as grid:
        assert grid.size == grid_size(rows=2, columns=3)


def test_grid_path_is_logged(runs, folders):
    assert str(folders["root"] / "grid" / "nested" / "grid.png") in runs["grid"].stderr


def test_unconditional_grid_is_near_square(runs, folders):
    result = runs["individual"]

    assert result.returncode == 0, result.stderr
    with Image.open(folders["root"] / "individual.png") as grid:
        assert grid.size == grid_size(rows=2, columns=3)


def test_save_individual_writes_each_image(runs, folders):
    assert runs["individual"].returncode == 0, runs["individual"].stderr

    files = sorted(os.listdir(folders["root"] / "images"))

    assert len(files) == 5
    for name in files:
        with Image.open(folders["root"] / "images" / name) as image:
            assert image.size == (SIZE, SIZE)


def test_images_independent_of_batch_size(sample_module, folders):
    # DDPM draws fresh noise at every step, so this also checks the per-image generators there.
    pipe = sample_module.load_pipeline(folders["conditional"])
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for batch_size in (1, 3):
        args = sample_module.parse_args(
            ["--model_dir", folders["conditional"], "--num_images", "3", "--batch_size", str(batch_size), *FAST]
        )
        images[batch_size] = sample_module.generate(pipe, args, [1, 2], torch.device("cpu"))

    assert images[1].shape == (6, 1, SIZE, SIZE)
    torch.testing.assert_close(images[1], images[3], rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available, so --device cuda is valid here")
def test_cuda_device_rejected_without_cuda(sample_module):
    with pytest.raises(sample_module.SampleError, match="CUDA is not available"):
        sample_module.resolve_device("cuda")


def test_malformed_labels_rejected(sample_module):
    with pytest.raises(sample_module.SampleError, match="comma-separated integers"):
        sample_module.parse_class_labels("0,x", num_classes=3, model_dir="model")


def test_empty_label_item_rejected(sample_module):
    with pytest.raises(sample_module.SampleError, match="empty item between commas"):
        sample_module.parse_class_labels("1,,2", num_classes=3, model_dir="model")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_folder", "does not exist"),
        ("no_model_index", "has no model_index.json"),
        ("label_out_of_range", "outside the model's classes 0..2"),
        ("labels_on_unconditional", "unconditional"),
        ("checkpoint_folder", "looks like a training checkpoint"),
        ("plot_routes_without_router", "--plot_routes needs a MoL model"),
    ],
)
def test_error_exits_with_one_line(runs, case, message):
    result = runs[case]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(error_lines) == 1
    assert message in error_lines[0]
