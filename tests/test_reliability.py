"""Input checks, one-line script errors and the safe-loading policy."""

import ast
import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from mol_diffusion import MoLPipeline, MoLTransformer2DModel
from mol_diffusion.training import ConfigError, parse_training_args
from mol_diffusion.training.checkpointing import read_data_position

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "train_unet.py"
SAMPLE_SCRIPT = REPO_ROOT / "sample.py"
DATA_FLAGS = ["--dataset_name", "builtin:digits"]


def make_model(**overrides):
    config = dict(
        sample_size=8, patch_size=2, in_channels=1, num_attention_heads=2, attention_head_dim=8,
        num_pool_blocks=2, num_routing_steps=3, router_hidden_size=8,
    )
    return MoLTransformer2DModel(**{**config, **overrides})


# Model inputs.


def test_input_dtype_must_match_weights():
    model = make_model()
    with pytest.raises(TypeError) as excinfo:
        model(torch.randn(2, 1, 8, 8, dtype=torch.float64), 1)

    message = str(excinfo.value)
    assert "`hidden_states`" in message
    assert "torch.float64" in message
    assert "torch.float32" in message


def test_autocast_input_dtype_accepted():
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample = model(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), 1).sample
    assert sample.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("granularity", ["sample", "token"])
def test_empty_batch_rejected(granularity):
    model = make_model(router_granularity=granularity)
    with pytest.raises(ValueError, match=r"`hidden_states` has batch size 0 \(shape \(0, 1, 8, 8\)\)"):
        model(torch.randn(0, 1, 8, 8), 1)


@pytest.mark.parametrize("height, width", [(16, 16), (12, 8), (4, 4)])
def test_other_input_size_keeps_shape(height, width):
    # Sizes other than sample_size are allowed when they are multiples of patch_size.
    model = make_model(out_channels=2)
    sample = model(torch.randn(3, 1, height, width), torch.tensor([1, 5, 9])).sample
    assert sample.shape == (3, 2, height, width)
    assert torch.isfinite(sample).all()


# Training configuration.


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seed_outside_numpy_range_rejected(seed):
    with pytest.raises(ConfigError, match=f"seed={seed} is invalid"):
        parse_training_args(DATA_FLAGS + ["--seed", seed])


def test_output_dir_that_is_a_file_rejected(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        parse_training_args(DATA_FLAGS + ["--output_dir", str(path)])


def test_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("learning_rate: [0.1\n")
    with pytest.raises(ConfigError) as excinfo:
        parse_training_args(["--config", str(path)])

    message = str(excinfo.value)
    assert "is not valid YAML" in message
    assert "line 2" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["[]", "0", "text"])
def test_model_key_must_be_mapping(tmp_path, value):
    path = tmp_path / "config.yaml"
    path.write_text(f"dataset_name: builtin:digits\nmodel: {value}\n")
    with pytest.raises(ConfigError, match="`model:` must be a mapping"):
        parse_training_args(["--config", str(path)])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_yaml_number_rejected(tmp_path, value):
    path = tmp_path / "config.yaml"
    path.write_text(f"dataset_name: builtin:digits\nlearning_rate: {value}\n")
    with pytest.raises(ConfigError, match="learning_rate=.* is invalid"):
        parse_training_args(["--config", str(path)])


# Script errors: train_unet.py's __main__ block, run in this process to skip the seconds of imports.


def script_error_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("learning_rate: [0.1\n")
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump(["learning_rate", 0.1]))
    output_file = tmp_path / "output_file"
    output_file.write_text("")
    return {
        "missing_data_dir": (["--train_data_dir", str(tmp_path / "absent")], "does not exist"),
        "empty_data_dir": (["--train_data_dir", str(empty)], "contains no image files"),
        "yaml_syntax": (["--config", str(syntax)], "is not valid YAML"),
        "yaml_not_mapping": (["--config", str(listing)], "expected a mapping"),
        "yaml_missing": (["--config", str(tmp_path / "absent.yaml")], "file not found"),
        "output_dir_file": (DATA_FLAGS + ["--output_dir", str(output_file)], "is a file, not a folder"),
    }


CASE_NAMES = [
    "missing_data_dir", "empty_data_dir", "yaml_syntax", "yaml_not_mapping", "yaml_missing", "output_dir_file",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_train_script_error_is_one_line(case, tmp_path, monkeypatch, capsys):
    flags, fragment = script_error_cases(tmp_path)[case]
    if "--output_dir" not in flags:
        flags = flags + ["--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", [str(TRAIN_SCRIPT), *flags])

    with pytest.raises(SystemExit) as excinfo:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")

    stderr = capsys.readouterr().err
    error_lines = [line for line in stderr.splitlines() if line.startswith("train_unet.py: error:")]
    assert excinfo.value.code == 2
    assert len(error_lines) == 1
    assert fragment in error_lines[0]
    assert "Traceback" not in stderr


# Non-finite losses.

TINY_MODEL = {
    "patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8,
    "num_pool_blocks": 2, "num_routing_steps": 2, "router_hidden_size": 8,
}


def test_nonfinite_updates_skipped_and_logged(tmp_path):
    # With a huge learning rate the first update succeeds and makes every later loss overflow.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "dataset_name": "builtin:digits", "resolution": 8, "train_batch_size": 8, "learning_rate": 1.0e30,
        "lr_warmup_steps": 0, "ddpm_num_steps": 100, "seed": 0, "max_nonfinite_steps": 2,
        "max_train_steps": 20, "checkpointing_steps": 100, "model": TINY_MODEL,
    }))
    output_dir = tmp_path / "out"
    command = [sys.executable, str(TRAIN_SCRIPT), "--config", str(config), "--output_dir", str(output_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 3, result.stderr[-3000:]
    assert "Non-finite loss at step 2: skipped the update (1 in a row, stopping at 2)" in result.stderr
    assert "Non-finite loss at step 2: skipped the update (2 in a row, stopping at 2)" in result.stderr
    checkpoint = output_dir / "checkpoint-1"
    optimizer_state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    assert {float(state["step"]) for state in optimizer_state.values()} == {1.0}  # skipped updates did not step
    # The skipped batches count as consumed, so a resumed run continues after them.
    assert read_data_position(str(checkpoint)).batches_done == 3


# Safe loading.

SOURCE_FILES = sorted(
    [REPO_ROOT / "train_unet.py", REPO_ROOT / "sample.py"]
    + list((REPO_ROOT / "mol_diffusion").rglob("*.py"))
    + list((REPO_ROOT / "benchmarks").rglob("*.py"))
)


def call_name(call):
    """`module.function` of a call such as torch.load(...), or the bare function name."""
    if isinstance(call.func, ast.Attribute):
        owner = call.func.value.id if isinstance(call.func.value, ast.Name) else "?"
        return f"{owner}.{call.func.attr}"
    return call.func.id if isinstance(call.func, ast.Name) else "?"


def keyword_value(call, name):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "<expression>"
    return None


def unsafe_calls(path):
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = call_name(node)
        where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        if name == "torch.load" and keyword_value(node, "weights_only") is not True:
            problems.append(f"{where}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(f"{where}: {name}")
        if name == "np.load" and keyword_value(node, "allow_pickle") not in (None, False):
            problems.append(f"{where}: np.load with allow_pickle")
        if keyword_value(node, "trust_remote_code") not in (None, False):
            problems.append(f"{where}: trust_remote_code")
        if keyword_value(node, "custom_pipeline") is not None:
            problems.append(f"{where}: custom_pipeline")
    return problems


def test_source_has_no_unsafe_loading():
    problems = [problem for path in SOURCE_FILES for problem in unsafe_calls(path)]
    assert problems == []


@pytest.mark.parametrize("path", ["sample.py", "mol_diffusion/training/checkpointing.py"])
def test_own_folders_load_safetensors_only(path):
    tree = ast.parse((REPO_ROOT / path).read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    calls = [call for call in calls if call_name(call).endswith("from_pretrained")]
    assert calls
    for call in calls:
        assert keyword_value(call, "use_safetensors") is True, f"{path}:{call.lineno}"


@pytest.fixture(scope="module")
def sample_module():
    spec = importlib.util.spec_from_file_location("sample_script_reliability", SAMPLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def saved_pipeline(tmp_path):
    torch.manual_seed(0)
    MoLPipeline(transformer=make_model(), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path)
    return tmp_path


def test_sample_rejects_pickled_weights(sample_module, saved_pipeline):
    weights = saved_pipeline / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()

    with pytest.raises(sample_module.SampleError, match="no file named diffusion_pytorch_model.safetensors"):
        sample_module.load_pipeline(str(saved_pipeline))


def test_sample_truncated_weights_error(sample_module, saved_pipeline):
    weights = saved_pipeline / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])

    with pytest.raises(sample_module.SampleError, match="could not be loaded"):
        sample_module.load_pipeline(str(saved_pipeline))


def test_sample_invalid_model_config_error(sample_module, saved_pipeline):
    config_path = saved_pipeline / "transformer" / "config.json"
    config_path.write_text(config_path.read_text().replace('"router_mode": "learned"', '"router_mode": "random"'))

    with pytest.raises(sample_module.SampleError, match="`router_mode` must be one of"):
        sample_module.load_pipeline(str(saved_pipeline))
