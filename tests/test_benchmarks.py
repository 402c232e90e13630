"""Smoke tests of benchmarks/speed.py, quality.py and routing_speed.py, and of train_unet.py's --max_train_minutes."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mol_diffusion.evaluation import get_digit_classifier
from mol_diffusion.training import ConfigError, parse_training_args

from helpers import REPO_ROOT, read_train_log, tiny_train_config

BENCHMARKS = REPO_ROOT / "benchmarks"

TINY_CONFIG = tiny_train_config(lr_scheduler="cosine")
# Small speed.py settings: 8x8 images, width 16, one timed repeat.
TINY_SPEED_FLAGS = [
    "--batch_size", "4", "--resolution", "8", "--width", "16", "--heads", "2", "--repeats", "1",
    "--num_inference_steps", "1", "--threads", "1",
]


def run(command, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, *map(str, command)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def load_speed_module():
    spec = importlib.util.spec_from_file_location("speed_benchmark", BENCHMARKS / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


# train_unet.py --max_train_minutes


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """A run with 10000 updates planned and a budget of 0.01 minutes (0.6 s)."""
    folder = tmp_path_factory.mktemp("budget")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    result = run([
        REPO_ROOT / "train_unet.py", "--config", config, "--output_dir", folder / "out", "--max_train_steps", "10000",
        "--max_train_minutes", "0.01", "--checkpointing_steps", "10000",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_train_log(folder / "out")
    return folder / "out", records, result.stderr


def test_time_budget_stops_training(budget_run):
    output_dir, records, stderr = budget_run
    last_step = records[-1]["step"]
    assert 1 <= last_step < 10000
    assert f"Stopped at step {last_step}" in stderr


def test_time_budget_stops_after_budget(budget_run):
    _, records, _ = budget_run
    # Every update before the last was logged before a budget check that found time left. The log
    # rounds elapsed seconds to 3 decimals, so an update at 0.5996 s is logged as 0.6.
    for record in records[:-1]:
        assert record["elapsed_seconds"] < 0.6 + 0.0005, record["step"]


def test_time_budget_saves_checkpoint_and_pipeline(budget_run):
    output_dir, records, _ = budget_run
    assert (output_dir / f"checkpoint-{records[-1]['step']}").is_dir()
    assert (output_dir / "model_index.json").is_file()


def test_time_budget_keeps_lr_schedule(budget_run):
    _, records, _ = budget_run
    step = records[-1]["step"]
    # Cosine decay over the planned 10000 updates, not over the updates that fit in the budget.
    expected = 1.0e-3 * 0.5 * (1 + math.cos(math.pi * step / 10000))
    assert records[-1]["lr"] == pytest.approx(expected, rel=1e-6)


def test_time_budget_must_be_positive():
    with pytest.raises(ConfigError, match="max_train_minutes=0.0"):
        parse_training_args(["--dataset_name", "builtin:digits", "--max_train_minutes", "0"])


# benchmarks/speed.py


def test_per_sample_loop_matches_dispatch():
    speed = load_speed_module()
    args = speed.parse_args(TINY_SPEED_FLAGS)
    grouped = speed.build_variant("mol", args)
    looped = speed.build_variant("per-sample-loop", args)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([0, 100, 300, 500, 700, 999])
    labels = torch.arange(6)
    with torch.no_grad():
        grouped_output = grouped.eval()(x, timesteps, class_labels=labels, return_routes=True)
        looped_output = looped.eval()(x, timesteps, class_labels=labels)
    assert grouped_output.routes.indices.unique().numel() > 1  # the batch really splits into groups
    torch.testing.assert_close(looped_output.sample, grouped_output.sample)


def test_speed_variants_share_width():
    speed = load_speed_module()
    args = speed.parse_args(TINY_SPEED_FLAGS)
    for name in ("mol", "sequential-8", "sequential-4", "cyclic", "token", "dit"):
        config = speed.build_variant(name, args).config
        assert config.num_attention_heads * config.attention_head_dim == 16, name


def test_speed_writes_tables(tmp_path):
    result = run([
        BENCHMARKS / "speed.py", *TINY_SPEED_FLAGS, "--variants", "mol,sequential-8,dit,per-sample-loop",
        "--output_json", tmp_path / "speed.json", "--output_md", tmp_path / "speed.md",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "speed.json").read_text())
    assert list(results["variants"]) == ["mol", "sequential-8", "dit", "per-sample-loop"]
    row = results["variants"]["mol"]
    assert row["train_images_per_second"] == pytest.approx(4 / row["train_step_seconds"])
    assert row["sampling_images_per_second"] > 0
    assert row["train_peak_memory_mib"] >= 0
    assert {goal["ratio"] for goal in results["goals"]} == {"mol / sequential-8", "per-sample-loop / mol", "mol / dit"}
    assert len(results["load_average_before"]) == 3
    assert "torch" in results["machine"]
    report = (tmp_path / "speed.md").read_text()
    assert "| per-sample-loop |" in report
    assert "Load average" in report


def test_speed_times_before_memory_allocator(monkeypatch, tmp_path):
    # The memory measurement maps every large tensor on its own, so it must start after the timed calls.
    speed = load_speed_module()
    events = []
    time_interleaved = speed.time_interleaved

    def recording_time_interleaved(*args, **kwargs):
        events.append("timing")
        return time_interleaved(*args, **kwargs)

    class RecordingAllocator:
        def __init__(self):
            events.append("allocator")

        def trim(self):
            pass

    monkeypatch.setattr(speed, "time_interleaved", recording_time_interleaved)
    monkeypatch.setattr(speed, "_GlibcAllocator", RecordingAllocator)
    speed.main(speed.parse_args([
        *TINY_SPEED_FLAGS, "--variants", "mol", "--output_json", str(tmp_path / "speed.json"),
        "--output_md", str(tmp_path / "speed.md"),
    ]))

    assert events == ["timing", "timing", "allocator"]


def test_speed_rejects_unknown_variant(capsys):
    speed = load_speed_module()
    with pytest.raises(SystemExit):
        speed.parse_args(["--variants", "mol,moe"])
    assert "unknown ['moe']" in capsys.readouterr().err


# benchmarks/routing_speed.py

# Small routing_speed.py settings: 8x8 images, width 16, 2 routing steps, one timed repeat.
TINY_ROUTING_FLAGS = [
    "--repeats", "1", "--sample_size", "8", "--num_attention_heads", "2", "--attention_head_dim", "8",
    "--num_routing_steps", "2", "--num_pool_blocks", "2", "--num_classes", "3", "--train_batch_size", "4",
    "--sample_batch_size", "3", "--num_inference_steps", "2",
]


def test_routing_speed_writes_results(tmp_path):
    result = run([BENCHMARKS / "routing_speed.py", *TINY_ROUTING_FLAGS, "--output", tmp_path / "routing.json"])

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "routing.json").read_text())
    cases = [(row["benchmark"], row["case"]) for row in results["rows"]]
    assert cases == [
        ("token routing", "training step"),
        ("token routing", "inference forward"),
        ("route-table sampling", "one class, no guidance"),
        ("router sampling (no table)", "one class, no guidance"),
        ("route-table sampling", "all classes, guidance 2"),
        ("router sampling (no table)", "all classes, guidance 2"),
    ]
    for row in results["rows"]:
        assert row["ratio"] == pytest.approx(row["routed_seconds"] / row["dense_seconds"])
    assert results["rows"][0]["goal"] == 1.15
    assert results["rows"][2]["goal"] == 1.02
    # One class for the whole batch: every routing step is one block call.
    assert results["shared_route_share"]["one class, no guidance"] == 1.0
    assert "torch" in results["machine"]
    assert "| token routing | training step |" in result.stdout


# benchmarks/compile_speed.py


def test_compile_speed_eager_smoke(tiny_config):
    # Eager mode only: compiling takes minutes on the CPU, and compile_model has its own tests.
    flags = ["--config", tiny_config, "--modes", "eager", "--steps", "2", "--warmup_steps", "1", "--threads", "1"]
    result = run([BENCHMARKS / "compile_speed.py", *flags])

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["batch_size"] == TINY_CONFIG["train_batch_size"]
    assert [entry["mode"] for entry in summary["results"]] == ["eager"]
    assert summary["results"][0]["median_step_seconds"] > 0
    assert summary["threads"] == 1


# benchmarks/quality.py


def test_quality_variants_keep_base_model_options(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # quality.py imports speed.py from its own folder
    quality = importlib.import_module("quality")
    base_config = tmp_path / "base.yaml"
    base_config.write_text(yaml.safe_dump(TINY_CONFIG))
    args = quality.parse_args(["--config", str(base_config), "--width", "16", "--heads", "2"])
    base_model = {"long_skip": True, "conv_channels": 8, "num_pool_blocks": 99, "router_mode": "cyclic"}

    configs = {}
    for name in ("sequential-4", "token", "dit"):
        model_name, path = quality.write_variant_config(args, {"seed": 3}, base_model, name, tmp_path)
        configs[name] = (model_name, yaml.safe_load(path.read_text()))

    model_name, sequential = configs["sequential-4"]
    assert model_name == "mol"
    assert sequential["seed"] == 3
    assert sequential["model"]["long_skip"] is True
    assert sequential["model"]["conv_channels"] == 8
    assert sequential["model"]["num_pool_blocks"] == 4  # the variant's own keys win
    assert sequential["model"]["router_mode"] == "sequential"
    assert configs["token"][1]["model"]["router_granularity"] == "token"
    assert configs["dit"][0] == "dit"
    assert "long_skip" not in configs["dit"][1]["model"]


def test_quality_smoke(tmp_path, tmp_path_factory):
    cache_dir = tmp_path_factory.getbasetemp() / "digits_classifier_cache"
    get_digit_classifier(cache_dir=cache_dir, dataset_name="builtin:digits")
    base_config = tmp_path / "base.yaml"
    base_config.write_text(yaml.safe_dump(TINY_CONFIG))
    output_dir = tmp_path / "quality"
    result = run(
        [
            BENCHMARKS / "quality.py", "--config", base_config, "--budget_minutes", "0.01", "--eval_points", "2",
            "--variants", "sequential-4", "--width", "16", "--heads", "2", "--eval_num_samples", "10",
            "--eval_inference_steps", "1", "--output_dir", output_dir,
        ],
        env={**os.environ, "MOL_DIFFUSION_CACHE": str(cache_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((output_dir / "quality.json").read_text())
    points = results["variants"]["sequential-4"]["points"]
    assert [point["segment"] for point in points] == [1, 2]
    assert points[0]["step"] < points[1]["step"]  # the second segment resumed and trained on
    assert points[0]["training_minutes"] < points[1]["training_minutes"]
    for point in points:
        assert point["frechet_distance"] > 0
        assert 0.0 <= point["class_accuracy"] <= 1.0
    assert (output_dir / "sequential-4" / "eval-segment-2.json").is_file()
    assert (output_dir / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / "quality.md").read_text().count("| sequential-4 |") == 2
