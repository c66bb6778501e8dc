"""Whether the configured model can be loaded at all, asked before any worker starts.

A model that cannot be reached would otherwise show up minutes later as a GPU worker retrying the
hub; ``videoqa up`` asks here first and stops with one line that says what to set. Only the
model's ``config.json`` is looked for: a local folder must hold it, and a hub id must have it in
the hub cache (``HF_HOME``) unless the hub answers within a few seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from worker.gpu.model import MODEL_HINT

UP_TINY = "(or run `videoqa up --tiny`)"
HUB_TIMEOUT_S = 5.0


def _looks_local(model: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else can only be a path.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def model_problem(model: str) -> str | None:
    """Why ``model`` (hub id or local folder) cannot be loaded here, in one line, or None."""
    if _looks_local(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            return f"no model folder at {model}: {MODEL_HINT} {UP_TINY}"
        if not (folder / "config.json").is_file():
            return f"{model} holds no config.json, so it is not a model folder: {MODEL_HINT} {UP_TINY}"
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return None
    except HFValidationError:
        return f"{model} is neither a model folder nor a hub id: {MODEL_HINT} {UP_TINY}"
    where = "the hub cache (HF_HOME)"
    if _offline():
        reason: str | None = f"{model} is not in {where} and HF_HUB_OFFLINE is set"
    else:
        reason = _hub_problem(model)
        if reason is None:
            return None
    return f"{reason}: {MODEL_HINT} {UP_TINY}"


def _hub_problem(model: str) -> str | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; the worker's token decides
    except RepositoryNotFoundError:
        return f"the hub has no model {model}"
    except Exception as exc:  # noqa: BLE001 - any failure to reach the hub means the same here
        return f"{model} is not in the hub cache (HF_HOME) and the hub cannot be reached ({type(exc).__name__})"
    return None
