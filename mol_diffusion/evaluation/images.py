"""Image batches for the feature extractors: conversion from pipeline outputs, resizing, dataset splits."""

import functools
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import rgb_to_grayscale

from ..data import load_image_dataset, to_num_channels

ImageBatch = Union[torch.Tensor, np.ndarray, Sequence[PIL.Image.Image]]


def to_image_tensor(images: ImageBatch) -> torch.Tensor:
    """Convert a batch of images, as diffusers pipelines return them, to a float tensor in [0, 1].

    Args:
        images (`torch.Tensor`, `np.ndarray` or list of `PIL.Image.Image`):
            A `(B, C, H, W)` tensor in [0, 1] (`output_type="pt"`), a `(B, H, W, C)` float array in
            [0, 1] (`output_type="np"`), or PIL images of one size (`output_type="pil"`).

    Returns:
        `torch.Tensor`: `(B, C, H, W)` float32 in [0, 1] on the device of a tensor input, else on the CPU.
    """
    if isinstance(images, torch.Tensor):
        tensor = images
    elif isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images must be a (B, H, W, C) array, got shape {images.shape}.")
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (B, C, H, W)
    else:
        arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
        if not arrays:
            raise ValueError("images is an empty list. Pass at least one image.")
        arrays = [array[..., None] if array.ndim == 2 else array for array in arrays]  # (H, W, C)
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, C, H, W)

    if tensor.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(tensor.shape)}.")
    return tensor.float()


def resize_images(images: torch.Tensor, size: int, num_channels: int) -> torch.Tensor:
    """Resize `(B, C, H, W)` images to `(B, num_channels, size, size)` (bilinear, antialiased).

    Grey images are repeated to 3 channels and RGB images are reduced to luminance for 1 channel.
    """
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels} (shape {tuple(images.shape)}).")
    if num_channels == 3 and channels == 1:
        images = images.expand(-1, 3, -1, -1)
    elif num_channels == 1 and channels == 3:
        images = rgb_to_grayscale(images)

    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def load_split_images(
    dataset_name: str, split: str, num_channels: int = 1, cache_dir: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a labelled image dataset as tensors.

    Args:
        dataset_name (`str`): A name accepted by `mol_diffusion.data.load_image_dataset`, such as
            `"builtin:mnist5k"`.
        split (`str`): The split, for example `"train"` or `"test"`.
        num_channels (`int`, defaults to 1): Channels of the returned images (1 grey, 3 RGB).
        cache_dir (`str`, *optional*): Cache folder for hub datasets.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: Images `(N, num_channels, H, W)` float32 in [0, 1] and labels
        `(N,)` long. The tensors are new copies, so callers may modify them.
    """
    images, labels = _load_split_arrays(dataset_name, split, num_channels, cache_dir)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


@functools.lru_cache(maxsize=8)
def _load_split_arrays(
    dataset_name: str, split: str, num_channels: int, cache_dir: Optional[str]
) -> tuple[np.ndarray, np.ndarray]:
    dataset = load_image_dataset(dataset_name=dataset_name, split=split, cache_dir=cache_dir)
    if "label" not in dataset.column_names:
        raise ValueError(
            f"Dataset {dataset_name!r} (split {split!r}) has no label column, but the digit classifier and "
            "the class-balanced reference sample need labels. Pass a labelled dataset."
        )

    pictures = [to_num_channels(image, num_channels) for image in dataset["image"]]
    sizes = {picture.size for picture in pictures}
    if len(sizes) != 1:
        raise ValueError(
            f"Dataset {dataset_name!r} (split {split!r}) has images of several sizes {sorted(sizes)[:5]}, "
            "so they cannot form one reference batch. Pass a dataset with images of one size."
        )

    images = to_image_tensor(pictures).numpy()  # (N, C, H, W)
    labels = np.asarray(dataset["label"], dtype=np.int64)
    return images, labels
