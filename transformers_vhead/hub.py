"""Pushing a value-head model to the hub with its model card."""

from __future__ import annotations


def push_to_hub(model, repo_id: str, *, overwrite_model_card: bool = False, **kwargs):
    """Placeholder: implemented with issue 6 (hub)."""
    raise NotImplementedError
