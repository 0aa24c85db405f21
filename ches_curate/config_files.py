"""Load a YAML (or JSON) settings file into a pydantic model, with errors that name the file and key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ches_curate.errors import ChesCurateError

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml_model(model: type[ModelT], path: str | os.PathLike, what: str) -> ModelT:
    """Validate the YAML (or JSON, which is YAML) file at `path` as `model`.

    A `ChesCurateError` names the file and each bad key, e.g.
    `dev.yaml: scoring.batch_size: Input should be greater than 0`.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ChesCurateError(f"cannot read {what} {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ChesCurateError(f"{path}: not valid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ChesCurateError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ChesCurateError as err:
        raise ChesCurateError(f"{path}: {err}") from err
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors())
        raise ChesCurateError(f"{path}: {problems}") from err
