"""Inception v3 pool features (2048-d) for standard FID, from a weights file that is already on disk.

NOTE: torchvision's ImageNet Inception v3 weights differ from the TensorFlow FID Inception that
pytorch-fid and published FID numbers use, and torchvision's network also pools slightly differently
in some blocks. FID from this module is therefore only comparable with FID computed the same way.
"""

import logging
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torchvision.models import Inception_V3_Weights, inception_v3

from .images import ImageBatch, resize_images, to_image_tensor

logger = logging.getLogger(__name__)

# State dict entries of the classifier heads, which FID features do not use.
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")


class InceptionWeightsNotFoundError(FileNotFoundError):
    """No Inception v3 weights file was given or found in torchvision's cache."""


class InceptionFeatureExtractor(nn.Module):
    r"""
    torchvision's Inception v3 up to the global average pool (pool3), as used for FID.

    Args:
        state_dict (`dict[str, torch.Tensor]`): Weights of torchvision's `inception_v3`. The `fc.*`
            and `AuxLogits.*` entries may be present and are ignored.
    """

    name = "inception_v3"
    image_size = 299
    num_channels = 3
    feature_dim = 2048

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        # init_weights=False skips the slow truncated-normal initialisation that the loaded weights replace.
        self.network = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        self.network.fc = nn.Identity()  # the forward pass then ends at the (B, 2048) pool output

        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(_UNUSED_PREFIXES)}
        missing, unexpected = self.network.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                "The weights are not an Inception v3 state dict for torchvision's inception_v3: "
                f"{len(missing)} missing keys (first: {missing[:3]}), {len(unexpected)} unexpected keys "
                f"(first: {unexpected[:3]}). Pass the state dict of torchvision.models.inception_v3."
            )
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def features(self, images: ImageBatch, batch_size: int = 50) -> torch.Tensor:
        r"""
        Compute the 2048-d pool features.

        Args:
            images (`torch.Tensor`, `np.ndarray` or list of `PIL.Image.Image`):
                `(B, C, H, W)` images in [0, 1] with C 1 or 3 and any H, W. Grey images are repeated to
                3 channels, and all are resized to 299x299 (bilinear, antialiased).
            batch_size (`int`, defaults to 50): Images per forward pass.

        Returns:
            `torch.Tensor`: `(B, 2048)` float32 features on the CPU.
        """
        images = to_image_tensor(images)
        device = next(self.parameters()).device
        features = []
        for start in range(0, images.shape[0], batch_size):
            batch = resize_images(images[start : start + batch_size].to(device), self.image_size, self.num_channels)
            # The weights expect inputs in [-1, 1]. torchvision's transform_input=True maps
            # ImageNet-normalised inputs there, and mapping [0, 1] directly is the same.
            features.append(self.network(batch * 2.0 - 1.0).cpu())  # (B, 2048)
        return torch.cat(features)


def default_inception_weights_path() -> Path:
    """Return where torchvision caches its Inception v3 weights (`$TORCH_HOME/hub/checkpoints/...`)."""
    file_name = Inception_V3_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def load_inception_feature_extractor(
    weights_path: Optional[Union[str, Path]] = None, device: Optional[Union[str, torch.device]] = None
) -> InceptionFeatureExtractor:
    r"""
    Build the FID feature extractor from a local weights file. Nothing is downloaded.

    Args:
        weights_path (`str` or `Path`, *optional*): A state dict of torchvision's `inception_v3`, as
            `.safetensors` or as a `torch.save` file (loaded with `weights_only=True`). Defaults to
            torchvision's cache file (see [`default_inception_weights_path`]) when that exists.
        device (`str` or `torch.device`, *optional*): Device of the returned model, by default the CPU.

    Returns:
        [`InceptionFeatureExtractor`]: The extractor in eval mode.

    Raises:
        [`InceptionWeightsNotFoundError`]: No weights file at `weights_path` or in torchvision's cache.
        `ValueError`: The file is not an Inception v3 state dict.
    """
    path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
    if not path.is_file():
        missing_file = f"The weights file {str(path)!r} does not exist. " if weights_path is not None else ""
        raise InceptionWeightsNotFoundError(
            f"{missing_file}FID needs Inception v3 weights, and this tool does not download them (no network "
            "access is assumed). Pass a local state dict of torchvision's inception_v3 with "
            f"--inception_weights PATH (.safetensors or .pth), or place torchvision's file at "
            f"{default_inception_weights_path()}. Without them, use --metric digits."
        )

    if path.suffix == ".safetensors":
        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{str(path)!r} contains a {type(state_dict).__name__}, not a state dict of tensors.")

    logger.info("Loaded Inception v3 weights from %s.", path)
    return InceptionFeatureExtractor(state_dict).to(device or "cpu")
