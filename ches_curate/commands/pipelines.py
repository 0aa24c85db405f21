"""`ches-curate run`, `runs` and `schedule`: run the ZenML pipelines, look at past runs, or schedule one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ches_curate.commands import tables
from ches_curate.errors import ChesCurateError
from ches_curate.pipeline_config import PipelineConfig, find_config

console = Console(soft_wrap=True)

PIPELINE_HELP = "curation, ablation, refresh or refusal."
CONFIG_HELP = "Pipeline config: a YAML file, or a shipped config by name (demo, dev, gpu, kubernetes, refusal, ...)."
RUN_CONFIG_HELP = CONFIG_HELP + " Required but for refusal, which defaults to the shipped `refusal`."
SMALL_HELP = "refusal only: the CPU-sized shipped config `refusal_small` (--config overrides it)."
DB_HELP = "DuckDB store file; overrides the config's `store`."
PLUGIN_HELP = "Plugin module (import name or .py path) to load besides the config's `plugins` (repeatable)."
DEFAULT_CONFIG = Path("dev")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("runs")(runs)
    app.command("schedule")(schedule)


def load_config(config: Path, db: Path | None, pipeline: str, plugins: list[str] = ()) -> PipelineConfig:
    """The validated config, `--db` and `--plugin` applied, paths made absolute, settings checked (plugins loaded)
    before ZenML starts."""
    from ches_curate.curation import check_config

    loaded = PipelineConfig.from_file(config).with_store(db).with_plugins(list(plugins)).resolved()
    check_config(loaded, pipeline)
    return loaded


def run(
    pipeline: str = typer.Argument(..., help=PIPELINE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=RUN_CONFIG_HELP),
    small: bool = typer.Option(False, "--small", help=SMALL_HELP),
    db: Optional[Path] = typer.Option(None, "--db", envvar="CHES_CURATE_DB", help=DB_HELP),
    plugin: list[str] = typer.Option([], "--plugin", help=PLUGIN_HELP),
) -> None:
    """Run a ZenML pipeline: curation (ingest → validate → score → validate → filter → export),
    ablation (DPO on curated vs full vs random arms), refresh (only what changed) or refusal (Razin et al.'s
    Section 6: on-policy refusal pairs, DPO on all vs the lowest ln-CHES vs random, refusal rates)."""
    from ches_curate.pipelines import PIPELINES, run_pipeline

    if pipeline not in PIPELINES:
        raise ChesCurateError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    loaded = load_config(run_config_path(pipeline, config, small), db, pipeline, plugin)
    result = run_pipeline(pipeline, loaded)
    if result is None or str(result.status.value) != "completed":
        status = "submitted" if result is None else str(result.status.value)
        where = "" if result is None else f" as run {result.name} ({result.id})"
        console.print(f"{pipeline} pipeline {status}{escape(where)}; follow it with `zenml pipeline runs list`",
                      highlight=False)
        return
    if pipeline == "ablation":
        show_ablation(result)
    elif pipeline == "refusal":
        show_refusal(result)
    else:
        show_curation(result)


def run_config_path(pipeline: str, config: Path | None, small: bool) -> Path:
    """The config `run` loads: `--config`, else for refusal the shipped refusal.yaml (refusal_small.yaml with
    `--small`); the other pipelines require `--config`."""
    if small and pipeline != "refusal":
        raise typer.BadParameter(f"--small is for the refusal pipeline only, not {pipeline}", param_hint="'--small'")
    if config is not None:
        return config
    if pipeline != "refusal":
        raise typer.BadParameter(f"required for the {pipeline} pipeline (only refusal has a default config)",
                                 param_hint="'--config' / '-c'")
    from ches_curate.pipeline_config import shipped_configs

    return shipped_configs()["refusal_small" if small else "refusal"]


def show_curation(run_response: Any) -> None:
    """What a curation or refresh run did, and where to look next."""
    from ches_curate.pipelines.curation import curation_outcome

    outcome = curation_outcome(run_response)
    version, scored, selection = outcome["dataset_version"], outcome["score_run"], outcome["selection"]
    console.print(f"[bold]{escape(outcome['run_name'])}[/] {outcome['status']} (ZenML run id {outcome['run_id']}, "
                  f"model ches_curate version {outcome['model_version']})", highlight=False)
    if outcome["cached_steps"]:
        console.print(f"from ZenML's cache (the numbers of the run that computed them): "
                      f"{', '.join(outcome['cached_steps'])}", highlight=False)
    state = "new version" if version["created"] else "unchanged"
    console.print(f"dataset [bold]{escape(version['name'])}[/] v{version['version']} ({state}): "
                  f"{version['n_pairs']:,} pairs, {version['n_quarantined']:,} quarantined at ingest", highlight=False)
    console.print(f"scored {scored['n_scored']:,} new pairs ({scored['n_skipped']:,} already scored, "
                  f"{scored['n_failed']:,} failed) with {escape(scored['model_key'])} in {scored['wall_time_s']:.1f} s; "
                  f"ches p50 {scored.get('ches_p50', float('nan')):.4g}, p95 {scored.get('ches_p95', float('nan')):.4g}",
                  highlight=False)
    console.print(f"selection {selection['selection_id']}: {escape(selection['policy'])} "
                  f"{escape(json.dumps(selection['policy_params']))} kept {selection['n_kept']:,} of "
                  f"{selection['n_selected_from']:,} ({selection['kept_fraction']:.1%}), "
                  f"{selection['n_excluded_quarantined']:,} quarantined pairs left out", highlight=False)
    if "diff_unchanged" in selection:
        changes = ", ".join(f"{selection[f'diff_{c}']:,} {c.replace('_', ' ')}"
                            for c in ("added", "removed", "now_kept", "now_removed"))
        console.print(f"changes since selection {selection['previous_selection_id']}: {changes}, "
                      f"{selection['diff_unchanged']:,} unchanged", highlight=False)
    console.print(f"curated pairs: [bold]{escape(outcome['curated_path'])}[/]", highlight=False)
    if outcome["report_path"]:
        console.print(f"report: [bold]{escape(outcome['report_path'])}[/]", highlight=False)
    where_to_look(outcome["store"], selection["selection_id"], outcome["run_id"])


def where_to_look(store: str, selection_id: int, run_id: str) -> None:
    db = f"--db {store}"
    console.print("\n[bold]where to look[/]")
    console.print(f"  DuckDB store: {escape(store)}", highlight=False)
    for query in ("SELECT * FROM score_summary", "SELECT stage, reason FROM quarantine",
                  f"SELECT kept, count(*) FROM selections WHERE selection_id = {selection_id} GROUP BY kept",
                  "SELECT run_id, n_scored, n_skipped, zenml_run_id FROM score_runs"):
        console.print(f"  ches-curate sql \"{escape(query)}\" {escape(db)}", highlight=False)
    console.print(f"  ches-curate runs {run_id} (its metadata and artifacts); dashboard: `zenml login --local`",
                  highlight=False)


ABLATION_COLUMNS = ("ablation_id", "arm", "n_train_pairs", "preferred_logp_change", "preferred_decrease_fraction",
                    "refusal_rate_before", "refusal_rate_after")
REFUSAL_COLUMNS = ("ablation_id", "arm", "train_seed", "n_train_pairs", "refusal_rate_before", "refusal_rate_after",
                   "preferred_logp_change", "dispreferred_logp_change", "wall_time_s")


def show_ablation(run_response: Any) -> None:
    """The `ablations` rows the run wrote."""
    from ches_curate.pipelines.ablation import ablation_outcome

    _show_ablations(ablation_outcome(run_response), ABLATION_COLUMNS)


def show_refusal(run_response: Any) -> None:
    """The on-policy pairs the refusal run generated, and per arm and seed its refusal rate before and after DPO."""
    from ches_curate.pipelines.refusal import refusal_outcome

    outcome = refusal_outcome(run_response)
    made = outcome["generation"]
    console.print(f"{made['n_prompts']:,} prompts → {made['n_pairs']:,} pairs ({made['n_refusal_vs_compliance']:,} "
                  f"refusal vs compliance, {made['n_both_refuse']:,} both refuse: {made['both_refuse_share']:.1%}); "
                  f"dropped {made['n_both_comply']:,} with two compliant responses, {made['n_identical']:,} identical "
                  f"refusals, {made['n_both_refuse_dropped']:,} other two-refusal pairs; sampled refusal rate "
                  f"{made['sample_refusal_rate']:.1%}; {made['n_eval_prompts']:,} held-out prompts; pairs in "
                  f"{escape(made['path'])}", highlight=False)
    _show_ablations(outcome, REFUSAL_COLUMNS)


def _show_ablations(outcome: dict[str, Any], columns: tuple[str, ...]) -> None:
    console.print(f"[bold]{escape(outcome['run_name'])}[/] {outcome['status']} (ZenML run id {outcome['run_id']})",
                  highlight=False)
    tables.print_table(console, [tables.Column(c, numeric=c != "arm") for c in columns],
                       [[tables.cell(row.get(c)) for c in columns] for row in outcome["ablations"]], title="ablations")
    console.print(f"in the store: ches-curate sql \"SELECT * FROM ablations\" --db {escape(outcome['store'])}",
                  highlight=False)


def runs(
    run_id_or_name: Optional[str] = typer.Argument(None, metavar="[RUN_ID_OR_NAME]",
                                                   help="One run to show in full (a name, id or id prefix)."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many recent runs to list."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="List only this pipeline's runs: "
                                           + PIPELINE_HELP),
) -> None:
    """List the recent runs of the curation, refresh and ablation pipelines (dataset version, selection, report),
    or show one run: its metadata, report, curated file and artifact ids."""
    from ches_curate.pipelines import runs as past

    if run_id_or_name is not None:
        show_run(past.find_run(run_id_or_name))
        return
    found = past.recent_runs(limit, pipeline)
    columns = [tables.Column("run"), tables.Column("pipeline"), tables.Column("status"), tables.Column("started (UTC)"),
               tables.Column("dataset"), tables.Column("selection", numeric=True), tables.Column("report")]
    tables.print_table(console, columns, [
        [r.name, r.pipeline, r.status, _time(r.start_time), _dataset(r), tables.cell(r.selection_id),
         tables.cell(r.report_path)] for r in found], title="recent pipeline runs, newest first")
    if found:
        console.print(f"one run in full: ches-curate runs {escape(found[0].name)}", highlight=False)


def show_run(run_response: Any) -> None:
    """One run: its numbers, where its files are, and its metadata and artifacts as tables."""
    from ches_curate.pipelines import runs as past

    run = past.summarize(run_response)
    console.print(f"[bold]{escape(run.name)}[/] ({run.pipeline} pipeline) {run.status}, started "
                  f"{_time(run.start_time)} UTC; ZenML run id {run.run_id}", highlight=False)
    console.print(f"dataset {escape(_dataset(run))}, selection {tables.cell(run.selection_id)}", highlight=False)
    for label, path in (("curated pairs", run.curated_path), ("report", run.report_path)):
        if path:
            console.print(f"{label}: [bold]{escape(path)}[/]", highlight=False)
    tables.print_table(console, [tables.Column("stage"), tables.Column("key"), tables.Column("value", wrap=True)],
                       _metadata_rows(run.metadata), title="metadata")
    tables.print_table(console, [tables.Column("step"), tables.Column("artifact"), tables.Column("version"),
                                 tables.Column("artifact version id")],
                       [[a.step, a.name, a.version, a.artifact_id] for a in past.run_artifacts(run_response)],
                       title="artifacts (load one: Client().get_artifact_version(ID).load())")


def _metadata_rows(metadata: dict[str, Any]) -> list[list[tables.Cell]]:
    """One row per key of each stage's entry; nested values (a quality suite's summary) as JSON."""
    rows = []
    for stage, entry in metadata.items():
        for key, value in (entry.items() if isinstance(entry, dict) else [("", entry)]):
            rows.append([stage, key, tables.cell(json.dumps(value) if isinstance(value, (dict, list)) else value)])
    return rows


def _time(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def _dataset(run: Any) -> str:
    return f"{run.dataset} v{run.dataset_version}" if run.dataset is not None else "-"


def schedule(
    cron: str = typer.Option(..., "--cron", help="Five-field cron expression, e.g. \"0 3 * * *\" (daily at 03:00)."),
    pipeline: str = typer.Option("refresh", "--pipeline", help=PIPELINE_HELP),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", "-c", help=CONFIG_HELP),
    db: Optional[Path] = typer.Option(None, "--db", envvar="CHES_CURATE_DB", help=DB_HELP),
    local: bool = typer.Option(False, "--local", help="On a local orchestrator: install a crontab entry instead."),
    systemd: bool = typer.Option(False, "--systemd", help="On a local orchestrator: write a systemd user timer "
                                 "(~/.config/systemd/user) instead."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be scheduled or installed; change nothing."),
) -> None:
    """Run a pipeline on a cron schedule: a ZenML Schedule when the active orchestrator supports schedules
    (Kubernetes, Kubeflow, Vertex, SageMaker, AzureML, Airflow, Databricks), else cron or systemd."""
    from ches_curate import schedule as sched
    from ches_curate.pipelines import PIPELINES, active_orchestrator

    if pipeline not in PIPELINES:
        raise ChesCurateError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    cron = sched.validate_cron(cron)
    loaded = load_config(config, db, pipeline)
    stack, flavor, declared = active_orchestrator()
    if sched.supports_schedules(flavor, declared):
        _zenml_schedule(pipeline, loaded, cron, stack, flavor, dry_run)
        return
    console.print(f"The active stack '{escape(stack)}' uses the '{escape(flavor)}' orchestrator, which cannot run "
                  "schedules; the machine's scheduler can run the same pipeline instead.", highlight=False)
    command = sched.ches_curate_command(pipeline, find_config(config), db)
    workdir = Path.cwd()
    log = sched.log_path(pipeline)
    if systemd:
        _systemd(cron, command, workdir, pipeline, log, dry_run)
        return
    line = sched.crontab_line(cron, command, workdir, log, pipeline)
    if dry_run or not local:
        verb = "would install" if dry_run else "run again with --local to install (or --systemd for a timer)"
        console.print(f"{verb} this crontab entry:\n{escape(line)}", highlight=False, soft_wrap=True)
        if not dry_run:
            raise typer.Exit(1)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    change = sched.install_crontab_line(line, pipeline)
    replaced = f" (replacing {change.replaced} earlier entry)" if change.replaced else ""
    console.print(f"installed this crontab entry{replaced}:\n{escape(line)}", highlight=False, soft_wrap=True)
    console.print(f"output goes to {escape(str(log))}", highlight=False)


def _systemd(cron: str, command: list[str], workdir: Path, pipeline: str, log: Path, dry_run: bool) -> None:
    """Write the service and timer into the systemd user directory (print them with --dry-run), and say how to
    start the timer."""
    from ches_curate import schedule as sched

    units = sched.systemd_units(cron, command, workdir, pipeline, log)
    directory = sched.systemd_user_dir()
    if dry_run:
        for name, text in units.items():
            console.print(f"\nwould write [bold]{escape(str(directory / name))}[/]:\n{escape(text)}", highlight=False)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        for path in sched.write_systemd_units(units, directory):
            console.print(f"wrote {escape(str(path))}", highlight=False)
    console.print("start the timer with:\n  " + "\n  ".join(sched.systemd_install_commands(units)), highlight=False)
    console.print(f"output goes to {escape(str(log))}; stop it with `systemctl --user disable --now "
                  f"ches-curate-{pipeline}.timer`", highlight=False)


def _zenml_schedule(pipeline: str, config: PipelineConfig, cron: str, stack: str, flavor: str, dry_run: bool) -> None:
    name = f"ches-curate-{pipeline}"
    if dry_run:
        console.print(f"would attach ZenML Schedule(name={name!r}, cron_expression={cron!r}) to the {pipeline} "
                      f"pipeline on stack '{escape(stack)}' ({escape(flavor)} orchestrator)", highlight=False)
        return
    from zenml.config.schedule import Schedule

    from ches_curate.pipelines import run_pipeline

    run_pipeline(pipeline, config, schedule=Schedule(name=name, cron_expression=cron))
    console.print(f"scheduled the {pipeline} pipeline as {name!r} ({cron}) on stack '{escape(stack)}' "
                  f"({escape(flavor)} orchestrator); list schedules with `zenml pipeline schedule list`",
                  highlight=False)
