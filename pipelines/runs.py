"""Past runs of the pipelines: their artifacts by name, a listing of recent runs, one run's metadata.

Artifacts are named for their dataset (`scores_{dataset}`: `scores_hh_rlhf_harmless`), so
each dataset has its own version series in ZenML, and tagged `dataset:NAME` and
`NAME:vN` (the dataset version they came from), as is the run. `step_output` finds an
output by its stem (`scores`) in runs named either way. Importing this module does not
import ZenML.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ches_curate.errors import ChesCurateError
from ches_curate.pipelines.runner import PIPELINES

DATASET_PLACEHOLDER = "dataset"
"""The substitution the pipelines set to the config's dataset name; artifact names use it."""
DEFAULT_DATASET = "pairs"
"""Its value where a pipeline sets none (a user's pipeline calling the library's steps): `scores_pairs`."""
PROCESS = "process"
"""The run metadata entry naming the process that runs the steps (`mark_process`): host, pid, start time."""
STAGES = ("generation", "ingest", "pairs_quality", "scoring", "scores_quality", "selection", "export", "report", "ablation")
"""The run metadata entries the steps log, in pipeline order."""


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


@dataclass(frozen=True)
class RunSummary:
    """One run of the pipelines as `ches-curate runs` lists it, from the run's metadata."""

    name: str
    run_id: str
    pipeline: str
    """`curation`, `refresh` or `ablation`."""
    status: str
    start_time: datetime | None
    dataset: str | None
    dataset_version: int | None
    selection_id: int | None
    report_path: str | None
    curated_path: str | None
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    """The run's metadata: one entry per stage (`ingest`, `scoring`, `selection`, `export`, `report`, ...)."""


@dataclass(frozen=True)
class RunArtifact:
    step: str
    name: str
    version: str
    artifact_id: str


def recent_runs(limit: int = 20, pipeline: str | None = None) -> list[RunSummary]:
    """The latest `limit` runs of the curation, refresh and ablation pipelines (or of `pipeline`), newest first."""
    if pipeline is not None and pipeline not in PIPELINES:
        raise ChesCurateError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    from zenml.client import Client

    names = [pipeline] if pipeline is not None else list(PIPELINES)
    runs = Client().list_pipeline_runs(sort_by="desc:created", size=limit, hydrate=True,
                                       pipeline_name="oneof:" + json.dumps([f"{name}_pipeline" for name in names]))
    return [summarize(run) for run in runs.items]


def summarize(run: Any) -> RunSummary:
    """A ZenML pipeline run (hydrated) as a `RunSummary`."""
    metadata = dict(sorted(run.run_metadata.items(), key=lambda item: (
        STAGES.index(item[0]) if item[0] in STAGES else len(STAGES), item[0])))
    ingest = metadata.get("ingest", {})
    return RunSummary(
        name=run.name, run_id=str(run.id), pipeline=run.pipeline.name.removesuffix("_pipeline") if run.pipeline else "",
        status=run_status(str(run.status.value), metadata.get(PROCESS)), start_time=run.start_time,
        dataset=ingest.get("name"), dataset_version=ingest.get("version"),
        selection_id=metadata.get("selection", {}).get("selection_id"),
        report_path=metadata.get("report", {}).get("report_path"),
        curated_path=metadata.get("export", {}).get("curated_path"), metadata=metadata,
    )


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """This process (or `pid`) as a run records it: the host, the pid and the process's start time, which tells a
    later process with the same pid from it."""
    import psutil

    process = psutil.Process(pid)
    return {"host": socket.gethostname(), "pid": process.pid, "started": process.create_time()}


def run_status(status: str, process: dict[str, Any] | None) -> str:
    """ZenML's status of a run, or `dead` for a run ZenML still calls running (or initializing) whose process on
    this host is gone (killed with -9, or the machine lost power): ZenML's local orchestrator has no heartbeat, so
    such a run would otherwise stay `running` for ever. A run on another host keeps ZenML's status."""
    if status not in ("running", "initializing") or not process or process.get("host") != socket.gethostname():
        return status
    import psutil

    try:
        alive = abs(process_identity(int(process["pid"]))["started"] - float(process["started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        alive = False
    return status if alive else "dead"


def find_run(name_or_id: str) -> Any:
    """The pipeline run with this name, id or unique id prefix."""
    from zenml.client import Client

    try:
        return Client().get_pipeline_run(name_or_id)
    except KeyError:
        raise ChesCurateError(f"no pipeline run named {name_or_id!r} (nor with that id); `ches-curate runs` lists "
                              "the recent ones") from None


def run_artifacts(run: Any) -> list[RunArtifact]:
    """Every output artifact of a run, step by step in execution order."""
    return [RunArtifact(step, artifact.name, str(artifact.version), str(artifact.id))
            for step, step_run in run.steps.items()
            for outputs in step_run.outputs.values() for artifact in outputs]
