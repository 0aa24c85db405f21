"""Artifacts of the pipeline runs by name: named for their dataset, tagged with its version.

Artifacts are named for their dataset (`scores_{dataset}`: `scores_hh_rlhf_harmless`), so
each dataset has its own version series in ZenML, and tagged `dataset:NAME` and
`NAME:vN` (the dataset version they came from), as is the run. `step_output` finds an
output by its stem (`scores`) in runs named either way. Importing this module does not
import ZenML.
"""

from __future__ import annotations

from typing import Any

DATASET_PLACEHOLDER = "dataset"
"""The substitution the pipelines set to the config's dataset name; artifact names use it."""
def artifact_template(stem: str) -> str:
    """The name template of an output artifact: `scores` -> `scores_{dataset}`."""
    return f"{stem}_{{{DATASET_PLACEHOLDER}}}"


def dataset_tags(name: str, version: int) -> list[str]:
    """The tags of a dataset version's runs and artifacts: `dataset:NAME` and `NAME:vN`."""
    return [f"dataset:{name}", f"{name}:v{version}"]


def step_output(run: Any, step: str, stem: str) -> Any:
    """The artifact version a run's `step` produced as output `stem` (`scores` is `scores_<dataset>` in a run
    that named its artifacts for the dataset, `scores` in an older one); `.load()` reads it."""
    step_run = run.steps[step]
    dataset = step_run.config.substitutions.get(DATASET_PLACEHOLDER)
    name = artifact_template(stem).format(dataset=dataset) if dataset is not None else stem
    outputs = step_run.outputs
    return outputs[name if name in outputs else stem][0]
