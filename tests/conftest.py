import os

# Tests must never reach the Hugging Face Hub: fail fast instead of waiting on the network.
# Set before any test module imports huggingface_hub or datasets, which read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The test tensors are tiny, so a second thread only adds synchronisation, and on shared cores
# the threads wait on each other (measured here: the model tests ran 4-5x slower with 2 threads).
# The variable also reaches the scripts that tests start as subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def make_image_folder(tmp_path):
    """Return a function that writes {relative path: PIL image or raw bytes} under a new folder."""

    def make(files, name="images"):
        root = tmp_path / name
        root.mkdir()
        for relative_path, content in files.items():
            path = root / relative_path
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                content.save(path)
        return root

    return make
