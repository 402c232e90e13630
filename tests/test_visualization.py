"""Route statistics and plots, the router collapse warning, and the route plots of the two scripts."""

import importlib.util
import logging
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from PIL import Image

from mol_diffusion import MoLPipeline, MoLTransformer2DModel, RouteTrace
from mol_diffusion.training.monitoring import RoutePlotWriter, RunReporter, find_collapsed_block
from mol_diffusion.visualization import (
    block_usage,
    concatenate_traces,
    plot_routes,
    route_fractions,
    router_entropy,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_trace(indices, timesteps, num_blocks=3, probs=None, class_labels=None):
    """A RouteTrace from nested lists: indices (S, B) or (S, B, T), timesteps (B,); probs one-hot by default."""
    indices = torch.tensor(indices)
    if probs is None:
        probs = torch.nn.functional.one_hot(indices, num_blocks).float()
    return RouteTrace(
        indices=indices,
        probs=torch.as_tensor(probs, dtype=torch.float32),
        timesteps=torch.tensor(timesteps),
        class_labels=class_labels,
        num_blocks=num_blocks,
    )


def tiny_model(**overrides):
    config = dict(sample_size=8, patch_size=2, in_channels=1, num_attention_heads=2, attention_head_dim=8)
    config.update(num_pool_blocks=3, num_routing_steps=2, num_classes=4, router_hidden_size=8)
    config.update(overrides)
    torch.manual_seed(0)
    model = MoLTransformer2DModel(**config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def assert_png(path, min_width, min_height):
    with open(path, "rb") as file:
        assert file.read(8) == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= min_width
    assert height >= min_height


# Statistics, against counts written out by hand.


def test_fractions_per_step_and_timestep():
    # Two denoising steps of 4 samples, 2 routing steps, 3 blocks.
    first = make_trace([[0, 0, 1, 2], [1, 1, 1, 1]], [900, 900, 900, 900])
    second = make_trace([[2, 2, 2, 0], [0, 1, 0, 1]], [100, 100, 100, 100])

    stats = route_fractions([second, first])

    assert stats.timesteps.tolist() == [900, 100]  # sampling order
    assert stats.fractions.shape == (3, 2, 2)  # (K, S, N)
    expected = {  # (block, step, column): share
        (0, 0, 0): 2 / 4, (1, 0, 0): 1 / 4, (2, 0, 0): 1 / 4,
        (0, 1, 0): 0, (1, 1, 0): 1, (2, 1, 0): 0,
        (0, 0, 1): 1 / 4, (1, 0, 1): 0, (2, 0, 1): 3 / 4,
        (0, 1, 1): 2 / 4, (1, 1, 1): 2 / 4, (2, 1, 1): 0,
    }
    for (block, step, column), share in expected.items():
        assert stats.fractions[block, step, column].item() == pytest.approx(share), (block, step, column)


def test_token_fractions_count_tokens():
    # One routing step, two images of four tokens, both at timestep 5.
    trace = make_trace([[[0, 0, 0, 1], [2, 2, 1, 1]]], [5, 5])

    stats = route_fractions([trace])

    assert stats.num_decisions.tolist() == [[8]]
    assert stats.fractions[:, 0, 0].tolist() == pytest.approx([3 / 8, 3 / 8, 2 / 8])


def test_fractions_mix_timesteps_within_trace():
    trace = make_trace([[0, 1, 1]], [10, 20, 10], num_blocks=2)

    stats = route_fractions([trace])

    assert stats.timesteps.tolist() == [20, 10]
    assert stats.fractions[:, 0, 0].tolist() == [0, 1]  # timestep 20: one sample, block 1
    assert stats.fractions[:, 0, 1].tolist() == [0.5, 0.5]  # timestep 10: blocks 0 and 1


def test_fractions_timestep_bins():
    trace = make_trace([[0, 0, 1, 1]], [0, 100, 900, 999], num_blocks=2)

    stats = route_fractions([trace], timestep_bins=2)

    assert stats.timesteps.tolist() == pytest.approx([749.25, 249.75])  # bin centres over [0, 999]
    assert stats.fractions[:, 0, 0].tolist() == [0, 1]  # the upper bin contains 900 and 999
    assert stats.fractions[:, 0, 1].tolist() == [1, 0]


def test_block_usage_over_all_traces():
    first = make_trace([[0, 0], [1, 0]], [1, 1])
    second = make_trace([[2, 2], [2, 0]], [2, 2])

    assert block_usage([first, second]).tolist() == pytest.approx([4 / 8, 1 / 8, 3 / 8])


def test_router_entropy_weights_by_decisions():
    uniform = torch.full((1, 1, 2), 0.5)
    certain = torch.tensor([[[1.0, 0.0]]])
    one_sample = make_trace([[0]], [1], num_blocks=2, probs=uniform)
    three_samples = make_trace([[0, 0, 0]], [1, 1, 1], num_blocks=2, probs=certain.expand(1, 3, 2))

    entropy = router_entropy([one_sample, three_samples])

    assert entropy.tolist() == pytest.approx([math.log(2) / 4], abs=1e-6)


def test_concatenate_traces_joins_batches():
    labels = torch.tensor([3, 1])
    first = make_trace([[0, 1], [2, 2]], [7, 7], class_labels=labels)
    second = make_trace([[1], [0]], [7], class_labels=torch.tensor([0]))

    joined = concatenate_traces([first, second])

    assert joined.indices.tolist() == [[0, 1, 1], [2, 2, 0]]
    assert joined.probs.shape == (2, 3, 3)
    assert joined.class_labels.tolist() == [3, 1, 0]
    assert joined.timesteps.tolist() == [7, 7, 7]


def test_single_trace_accepted():
    trace = make_trace([[0, 0], [1, 0]], [1, 1])

    assert block_usage(trace).tolist() == block_usage([trace]).tolist()


def test_non_trace_rejected():
    with pytest.raises(TypeError, match="must be RouteTrace objects"):
        block_usage([{"indices": [0]}])


def test_mixed_pool_sizes_rejected():
    with pytest.raises(ValueError, match="pool sizes 3 and 2"):
        route_fractions([make_trace([[0]], [1]), make_trace([[0]], [1], num_blocks=2)])


# Plots.


def pipeline_traces(granularity, num_images=3, num_inference_steps=4):
    model = tiny_model(router_granularity=granularity)
    pipe = MoLPipeline(transformer=model, scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    output = pipe(
        class_labels=list(range(num_images)), num_inference_steps=num_inference_steps, output_type="pt",
        return_routes=True, generator=torch.Generator().manual_seed(0),
    )
    return output.routes, output.images


def test_plot_routes_writes_png(tmp_path):
    traces, _ = pipeline_traces("sample")
    path = tmp_path / "nested" / "routes.png"

    assert plot_routes(traces, str(path)) == str(path)
    assert_png(path, min_width=500, min_height=500)


def test_plot_routes_token_maps_make_taller_png(tmp_path):
    traces, images = pipeline_traces("token")
    plain = tmp_path / "plain.png"
    with_maps = tmp_path / "maps.png"

    plot_routes(traces, str(plain), max_token_images=0)
    plot_routes(traces, str(with_maps), images=images)

    assert_png(with_maps, min_width=500, min_height=500)
    with Image.open(plain) as plain_image, Image.open(with_maps) as map_image:
        assert map_image.size[1] > plain_image.size[1] + 100  # three rows of patch maps were added


def test_plot_routes_rejects_image_string(tmp_path):
    traces, _ = pipeline_traces("token")
    with pytest.raises(TypeError, match="`images` must be"):
        plot_routes(traces, str(tmp_path / "routes.png"), images="foo")


def test_plot_routes_rejects_image_count_mismatch(tmp_path):
    traces, images = pipeline_traces("token")
    with pytest.raises(ValueError, match="`images` has 2 images"):
        plot_routes(traces, str(tmp_path / "routes.png"), images=images[:2])


def test_route_table_traces_plot(tmp_path):
    model = tiny_model(router_input="none")
    path = tmp_path / "table.png"

    plot_routes(model.tabulate_routes(torch.arange(0, 50, 5)).to_traces(), str(path))

    assert_png(path, min_width=500, min_height=500)


def test_route_plot_writer_noises_fixed_batch(tmp_path):
    model = tiny_model(router_granularity="token")
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    writer = RoutePlotWriter(str(tmp_path), DDPMScheduler(num_train_timesteps=50), images, torch.tensor([0, 1, 2]))

    traces = writer.trace(model)
    path = writer.write(model, step=7)

    assert [trace.timesteps[0].item() for trace in traces] == writer.timesteps.tolist()
    assert writer.timesteps[0] == 49
    assert writer.timesteps[-1] == 0
    assert model.training is False  # restored to the mode it had
    assert path == os.path.join(str(tmp_path), "routes", "step-7.png")
    assert_png(path, min_width=500, min_height=500)


# Router collapse warning.


def test_collapse_found_for_one_block():
    assert find_collapsed_block(torch.tensor([0, 97, 3]), threshold=0.9) == (1, 0.97)


def test_collapse_not_found_when_balanced():
    assert find_collapsed_block(torch.tensor([30, 40, 30]), threshold=0.9) is None


def test_collapse_needs_two_blocks():
    assert find_collapsed_block(torch.tensor([12]), threshold=0.9) is None


def report_window(tmp_path, trace, caplog):
    """Feed one trace to a RunReporter with a window of 1 update and return the warnings logged."""
    accelerator = SimpleNamespace(is_main_process=True, is_local_main_process=False, log=lambda logs, step: None)
    reporter = RunReporter(
        accelerator, str(tmp_path), 0, 1, images_per_update=4, num_blocks=3, log_every_steps=1, collapse_threshold=0.9
    )
    zero = torch.zeros(())
    losses = SimpleNamespace(loss=zero, diffusion_loss=zero, vlb_loss=zero, aux_loss=zero)
    reporter.add_routes(trace)
    with caplog.at_level(logging.WARNING, logger="mol_diffusion.training.monitoring"):
        reporter.report(1, losses, lr=1e-3)
    reporter.close()
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_collapse_warning_for_single_block_trace(tmp_path, caplog):
    warnings = report_window(tmp_path, make_trace([[2, 2, 2, 2], [2, 2, 2, 2]], [1, 2, 3, 4]), caplog)

    assert len(warnings) == 1
    assert warnings[0].startswith("router collapse: block 2 took 100% of routes over the last 1 steps")


def test_no_collapse_warning_for_balanced_trace(tmp_path, caplog):
    warnings = report_window(tmp_path, make_trace([[0, 1, 2], [2, 1, 0]], [1, 2, 3]), caplog)

    assert warnings == []


# Scripts.


def test_sample_cli_plot_routes(tmp_path):
    # sample.py runs in this process: a new interpreter would spend most of the test on imports.
    spec = importlib.util.spec_from_file_location("sample_script", os.path.join(REPO_ROOT, "sample.py"))
    sample_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_script)
    folder = tmp_path / "pipeline"
    MoLPipeline(transformer=tiny_model(), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(folder)
    plot_path = tmp_path / "plots" / "routes.png"

    # Batches of 3 for 4 images: the route traces of two pipeline calls are joined.
    sample_script.main(
        sample_script.parse_args([
            "--model_dir", str(folder), "--class_labels", "0,1", "--num_images", "2", "--batch_size", "3",
            "--num_inference_steps", "2", "--output", str(tmp_path / "grid.png"), "--plot_routes", str(plot_path),
        ])
    )

    assert_png(plot_path, min_width=500, min_height=500)


def test_train_cli_writes_route_plots(tmp_path):
    config = {
        "dataset_name": "builtin:digits", "resolution": 8, "train_batch_size": 8, "lr_warmup_steps": 0,
        "ddpm_num_steps": 100, "seed": 0, "log_every_steps": 1, "checkpointing_steps": 10,
        "model": {
            "patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8, "num_pool_blocks": 2,
            "num_routing_steps": 2, "router_hidden_size": 8,
        },
    }
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output_dir = tmp_path / "run"

    result = subprocess.run(
        [
            sys.executable, os.path.join(REPO_ROOT, "train_unet.py"), "--config", str(config_path),
            "--output_dir", str(output_dir), "--max_train_steps", "3", "--route_plot_every_steps", "2",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(output_dir / "routes")) == ["step-2.png", "step-3.png"]
    assert_png(output_dir / "routes" / "step-3.png", min_width=500, min_height=500)
