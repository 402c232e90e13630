"""Publishing a training output folder to the Hugging Face Hub, as diffusers' training examples do.

The repository is created before training, so a missing token or a wrong repository id fails in
seconds rather than after a long run. The folder is uploaded once at the end, without the
accelerate checkpoints.
"""

import logging
import os
from typing import Optional

from huggingface_hub import create_repo, upload_folder

logger = logging.getLogger(__name__)

# Checkpoints hold optimizer state and are only needed to resume; `.tmp` folders are unfinished.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "*.tmp", "*.tmp/*", "logs/*"]


def create_hub_repo(output_dir: str, hub_model_id: Optional[str] = None, token: Optional[str] = None) -> str:
    """Create the model repository on the hub, or reuse it if it exists.

    Args:
        output_dir (`str`): Training output folder; its name is the repository name when
            `hub_model_id` is not set.
        hub_model_id (`str`, *optional*): `"namespace/name"` or `"name"` of the repository.
        token (`str`, *optional*): Hub token; by default the one stored by `hf auth login` or `HF_TOKEN`.

    Returns:
        `str`: The full repository id.
    """
    repo_id = hub_model_id or os.path.basename(os.path.normpath(output_dir))
    repo_id = create_repo(repo_id=repo_id, exist_ok=True, token=token).repo_id
    logger.info("Created or found the hub repository %s.", repo_id)
    return repo_id


def upload_output_folder(repo_id: str, output_dir: str, token: Optional[str] = None) -> None:
    """Upload the pipeline, model card, sample grids and training log of `output_dir` to `repo_id`.

    Args:
        repo_id (`str`): Repository id returned by [`create_hub_repo`].
        output_dir (`str`): Training output folder.
        token (`str`, *optional*): Hub token.
    """
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="End of training",
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
    logger.info("Uploaded %s to the hub repository %s.", output_dir, repo_id)
