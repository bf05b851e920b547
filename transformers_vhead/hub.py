"""Pushing a value-head model to the hub with its model card.

transformers' `PushToHubMixin.push_to_hub` writes its generic card (`create_and_tag_model_card`) over the `README.md` a
save wrote; this is the same flow (same arguments, same repo creation, same upload), with this package's card.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils.hub import hf_api

from .cards import render_model_card

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from transformers import PreTrainedModel

README = "README.md"


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | str | None = None,
    overwrite_model_card: bool = False,
) -> CommitInfo:
    """Uploads a value-head model to the hub: what `model.save_pretrained` writes, and its model card.

    The repo is created when it does not exist. The files are those of a local save: weights (sharded above
    `max_shard_size`), `config.json` and `generation_config.json`; for a PEFT policy, the adapter
    (`adapter_config.json`, `adapter_model.safetensors`), the value head (`value_head.safetensors`) and `config.json`.
    The card is this package's (see [`transformers_vhead.cards.render_model_card`]) with a usage snippet naming
    `repo_id`, and `model.model_tags` and `tags` added to its tags.

    Args:
        model: the value-head model to push.
        repo_id: the repo to push to (`"name"` is created in the token's namespace, `"org/name"` in the org's).
        commit_message: the commit message; transformers' default (`"Upload model"`) when `None`.
        commit_description: the description of the commit.
        private: whether a repo created here is private (`None`: the namespace's default). An existing repo keeps its
            visibility.
        token: the hub token; the stored one (`hf auth login`) when `None`.
        revision: the branch to push to, created from `main` when it does not exist.
        create_pr: open a pull request with the files instead of committing them to the branch.
        max_shard_size: the largest weights file before the checkpoint is sharded, as for `save_pretrained`.
        tags: tags to add to the card's metadata, besides `model.model_tags`.
        overwrite_model_card: replace a `README.md` already in the repo. By default a card on the hub is kept and
            only a repo (or branch) without one gets ours.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (its `pr_url` is set with `create_pr=True`).

    Example:

    ```python
    model = AutoModelForCausalLMWithValueHead.from_pretrained("org/sft-model")
    model.push_to_hub("org/ppo-critic", commit_message="Critic after 1k PPO steps", tags=["ppo"])
    ```
    """
    api = hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    keep_hub_card = not overwrite_model_card and api.file_exists(repo_id, README, revision=revision, token=token)
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
        card_path = os.path.join(tmp_dir, README)
        if keep_hub_card:  # the card `save_pretrained` wrote is not uploaded over the one on the hub
            Path(card_path).unlink(missing_ok=True)
        else:
            card = render_model_card(model.config, repo_id, model.v_head_source, model.name_or_path, _adapter_of(model))
            for tag in _tags(model.model_tags, tags):
                if tag not in card.data.tags:
                    card.data.tags.append(tag)
            card.save(card_path)
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )


def _adapter_of(model: PreTrainedModel):
    """The active adapter's config of a PEFT policy (saved as that adapter), else `None`."""
    return model.pretrained_model.active_peft_config if model.is_peft_model else None


def _tags(*groups: list[str] | str | None) -> list[str]:
    """The tags of each group in order; a group may be one tag (as `PreTrainedModel.push_to_hub` accepts) or `None`."""
    return [tag for group in groups if group for tag in ([group] if isinstance(group, str) else group)]
