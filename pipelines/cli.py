"""``practicum`` (also ``python -m pipelines``): run, study, compare, generate, ui."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USAGE = """practicum <command> ...

  run CONFIG.yaml [--section.key=value ...]   fit (then test) one experiment; --print_config shows the resolved config
  study STUDY.yaml [--workers N | --ray [ADDRESS]] [--resume] [--wide] [--section.key=value ...]
                                              every variant as a child run, then the comparison table
        [--plan] [--seeds auto]               --plan: the seeds each verdict needs (from the pilot or finished runs); auto: rounds until decided
  compare STUDY [--format table|csv|json|markdown] [--wide]   the study's table, rebuilt from MLflow
  estimate CONFIG.yaml [--gpu H100-80GB] [--section.key=value ...]   predict the fine-tune's memory per GPU, offline
  generate CHECKPOINT_OR_RUN_ID --prompt TEXT [--max_new_tokens N]   sample from a trained model
  sync [RUN_ID ...] [--tracking_uri URI]      send what runs kept locally while the tracking server was down
  summary STUDY_OR_YAML ...                   each study's one-line verdict and the URL of its runs
  ui [--port 5000] [--study NAME] [--open]    the MLflow UI on the tracking store, landing on a study's runs

  --verbose (any command): show what Lightning, MLflow and Python warnings say; quiet by default
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    verbose = "--verbose" in rest
    rest = [a for a in rest if a != "--verbose"]
    commands = {"run": cmd_run, "study": cmd_study, "compare": cmd_compare, "summary": cmd_summary,
                "estimate": cmd_estimate, "generate": cmd_generate, "sync": cmd_sync,
                "ui": cmd_ui}
    if cmd not in commands:
        print(f"practicum: unknown command '{cmd}'; choose one of: {', '.join(commands)}\n\n{USAGE}", file=sys.stderr)
        return 2
    from pipelines import console
    from pipelines.tracking import ConfigError, StageFailed, TrackingError

    console.configure(verbose)
    try:
        return commands[cmd](rest)
    except (ConfigError, TrackingError, StageFailed, FileNotFoundError, LookupError) as e:
        print(f"practicum {cmd}: error: {e}", file=sys.stderr)
        return 2


def cmd_run(args: list[str]) -> int:
    if not args or args[0].startswith("-") and args[0] not in ("--print_config", "--help", "-h"):
        print("usage: practicum run CONFIG.yaml [--section.key=value ...]", file=sys.stderr)
        return 2
    from pipelines.run import run_experiment

    config, rest = (None, args) if args[0].startswith("-") else (args[0], args[1:])
    if config and not Path(config).is_file():
        raise FileNotFoundError(f"config file '{config}' does not exist (configs live under configs/<project>/)")
    from pipelines.run import is_rank_zero

    res = run_experiment(config, rest)
    if is_rank_zero():  # under DDP every rank returns here; one prints
        _print_result(res)
    return 0 if res.status == "FINISHED" else 1


def _print_result(res) -> None:
    print(f"\nMLflow run {res.run_id}: {res.status}")
    if res.error:
        print(f"error: {res.error} (full traceback: artifact error.txt of the run)", file=sys.stderr)
    for k, v in res.headline().items():
        print(f"  {k:<28} {v:.6g}")


def cmd_study(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="practicum study")
    p.add_argument("study")
    p.add_argument("--tracking_uri")
    p.add_argument("--variants", nargs="+", help="run only these variants")
    p.add_argument("--no_system_metrics", action="store_true")
    p.add_argument("--workers", type=int, help="run N runs at once on this machine, each with its share of the cores")
    p.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS",
                   help="each run a Ray task: on the cluster at ADDRESS (or $RAY_ADDRESS), else a local instance")
    p.add_argument("--resume", action="store_true", help="continue the study's last run: only what is missing")
    p.add_argument("--seeds", choices=["auto"], help="seeds in rounds until every claim is decided "
                   "(as seeds: {pilot: 3, max: 20} in the file)")
    p.add_argument("--plan", action="store_true", help="read the study's finished runs (or run its pilot only) "
                   "and print the seeds each comparison and claim needs, with their wall time")
    p.add_argument("--wide", action="store_true", help="print every column of the final table, as compare --wide")
    ns, rest = p.parse_known_args(args)
    from pipelines import tracking as trk
    from pipelines.tables import render
    from pipelines.study import load_study, run_study

    if ns.plan:
        from pipelines.rounds import finished_table, plan_lines

        table = finished_table(load_study(ns.study).name, ns.tracking_uri)
        if table is None:
            _, table = run_study(ns.study, rest, ns.tracking_uri, only=ns.variants, seeds=ns.seeds,
                                 system_metrics=not ns.no_system_metrics, workers=ns.workers, ray=ns.ray,
                                 pilot_only=True)
        print("\n".join(["plan (80% power; nothing more is run):", *plan_lines(table)]))
        return 0
    parent, table = run_study(ns.study, rest, ns.tracking_uri, only=ns.variants, seeds=ns.seeds,
                              system_metrics=not ns.no_system_metrics, workers=ns.workers, ray=ns.ray,
                              resume=ns.resume)
    uri = trk.resolve_tracking_uri(ns.tracking_uri)
    client = trk.MlflowClient(uri)
    exp_id = client.get_run(parent).info.experiment_id
    print(f"\n{render(table, 'table', wide=ns.wide)}\n\nverdict: {table.verdict_line()}")
    print(f"runs:    {trk.runs_url(trk.ui_base(uri), exp_id, client)}" + ("" if uri.startswith("http") else "  (after: practicum ui)"))
    return 0 if (table.runs["status"] == "FINISHED").all() else 1


def cmd_summary(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="practicum summary")
    p.add_argument("studies", nargs="+", help="study names, or study YAML files")
    p.add_argument("--tracking_uri")
    ns = p.parse_args(args)
    from pipelines import tracking as trk
    from pipelines.compare import find_parent, study_table
    from pipelines.study import load_study

    uri = trk.resolve_tracking_uri(ns.tracking_uri)
    client = trk.MlflowClient(uri)
    for name in ns.studies:
        name = load_study(name).name if name.endswith((".yaml", ".yml")) else name
        parent = find_parent(client, name)
        table = study_table(client, parent)
        print(f"{name}: {table.verdict_line()}")
        for line in table.claim_lines():
            print(f"    {line}")
        print(f"    {trk.runs_url(trk.ui_base(uri), parent.info.experiment_id, client)}")
    print(_words_legend())
    if not uri.startswith("http"):
        print("(the links open once the UI runs: practicum ui)")
    return 0


def _words_legend() -> str:
    from pipelines.stats import WORDS

    return "verdicts:\n" + "\n".join(f"  {w:<12} {why}" for w, why in WORDS.items()) + \
        "\nclaims: holds / fails / inconclusive (the study's `claims:`, Holm across them)"


def cmd_compare(args: list[str]) -> int:
    from pipelines.tables import FORMATS, compare

    p = argparse.ArgumentParser(prog="practicum compare", epilog=_words_legend(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="the study's name (its `name:`), or a study YAML file")
    p.add_argument("--format", default="table", choices=FORMATS)
    p.add_argument("--wide", action="store_true", help="every column (the table: the report metric, its verdict "
                   "and the claims' metrics first, as many as fit the terminal, 100 columns without one)")
    p.add_argument("--tracking_uri")
    ns = p.parse_args(args)
    name = ns.study
    if name.endswith((".yaml", ".yml")):
        from pipelines.study import load_study

        name = load_study(name).name
    print(compare(name, ns.tracking_uri, ns.format, ns.wide))
    return 0


def cmd_estimate(args: list[str]) -> int:
    from modules.finetune.memory import OPTIMIZERS, STRATEGIES
    from pipelines.estimate import estimate_config, log_estimate

    p = argparse.ArgumentParser(prog="practicum estimate")
    p.add_argument("config")
    p.add_argument("--gpu", help="a card (H100-80GB, RTX4090-24GB, ...) or a byte count")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", choices=STRATEGIES, default=None)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--arch", help="a config.json (or its folder) to use instead of the backbone's")
    p.add_argument("--experiment", default="estimate")
    p.add_argument("--study", help="log the estimate as a child of this study's latest run (practicum compare shows it)")
    p.add_argument("--variant", help="with --study: the variant it predicts (default: the config's name)")
    p.add_argument("--tracking_uri")
    p.add_argument("--no_log", action="store_true")
    ns, rest = p.parse_known_args(args)
    est = estimate_config(ns.config, rest, ns.arch, ns.gpu, ns.devices, ns.strategy, ns.optimizer)
    print(f"{ns.config}: {est.setup}\n{est.table()}")
    if not ns.no_log:
        run_id = log_estimate(est, ns.experiment, ns.tracking_uri, Path(ns.config).stem, ns.study, ns.variant)
        print(f"MLflow run {run_id} " + (f"(study {ns.study!r})" if ns.study else f"(experiment {ns.experiment!r})"))
    return 0


def cmd_generate(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="practicum generate")
    p.add_argument("source", help="a .ckpt file, an exported model folder, or an MLflow run id")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking_uri")
    ns = p.parse_args(args)
    from pipelines.generate import load_generator

    model = load_generator(ns.source, ns.tracking_uri)
    print(model.generate_text(ns.prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                              top_k=ns.top_k, seed=ns.seed))
    return 0


def cmd_sync(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="practicum sync", description="Send the writes a run kept in its spool folder "
                                "(<store>/spool/RUN_ID) because the tracking server was down when it ended.")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="default: every run with a spool folder")
    p.add_argument("--tracking_uri", help="default: the server the run was logging to")
    p.add_argument("--wait_s", type=float, default=0.0, help="wait this long for an unreachable server")
    ns = p.parse_args(args)
    from mlflow.tracking import MlflowClient

    from pipelines import tracking as trk
    from pipelines.spool import Spool, spool_dir

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a server still down is reported, not waited on
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    root = trk.local_dir(trk.resolve_tracking_uri(ns.tracking_uri)) / "spool"
    run_ids = ns.run_ids or sorted(d.name for d in root.glob("*") if (d / "meta.json").is_file())
    if not run_ids:
        print(f"practicum sync: nothing to send ({root} holds no spooled run)")
        return 0
    left = 0
    for run_id in run_ids:
        folder = spool_dir(root.parent, run_id)
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"run {run_id} has nothing spooled in {root} (run practicum sync from the folder "
                                    "the run was started in, or pass the --tracking_uri it logged to)")
        spool = Spool.load(folder)
        if ns.tracking_uri:
            spool.client = MlflowClient(ns.tracking_uri)
        n, refused = len(spool.queue), 0
        while True:
            try:
                done = spool.flush(ns.wait_s)
                break
            except Exception as e:  # the server refused one write (dropped); the others still go
                refused += 1
                print(f"practicum sync: run {run_id}: a write was refused: {str(e).strip()[:300]}", file=sys.stderr)
        if done:
            print(f"run {run_id}: sent {n - refused} of {n} writes to {spool.client.tracking_uri}")
            left += bool(refused)
        else:
            left += 1
            print(f"practicum sync: run {run_id}: {spool.client.tracking_uri} is still unreachable; "
                  f"{len(spool.queue)} of {n} writes stay in {folder}", file=sys.stderr)
    return 1 if left else 0


def cmd_ui(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="practicum ui")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--study", help="land on this study's runs (default: the newest study)")
    p.add_argument("--open", action="store_true", help="open the page in the browser")
    p.add_argument("--workers", type=int, default=ui_workers(),
                   help="uvicorn worker processes (default: one per two CPU cores, at most 4)")
    p.add_argument("--tracking_uri")
    ns = p.parse_args(args)
    from pipelines import tracking as trk
    from pipelines.supervise import serve

    uri = trk.resolve_tracking_uri(ns.tracking_uri)
    base = trk.ui_base(uri, ns.host, ns.port)
    url = landing_url(uri, base, ns.study)
    if uri.startswith(("http://", "https://")):
        print(f"The tracking server has its own UI: {url}")
        _open(url, ns.open)
        return 0
    url = sticky_view(base, url)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", ns.host, "--port", str(ns.port),
           "--workers", str(max(1, ns.workers)), "--app-name", "practicum"]
    if art := trk.default_artifact_location(uri):
        cmd += ["--default-artifact-root", art]
    # No job runner: its huey consumers serve MLflow's GenAI jobs (scorers), which Practicum never submits.
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI on {uri}: {url}  (Ctrl-C stops it)", flush=True)

    def when_up():
        if ns.open and _wait_http(trk.ui_base(uri, ns.host, ns.port)):
            _open(url, True)

    return serve(cmd, env, when_up)  # SIGTERM or Ctrl-C stops mlflow and every worker it started


def ui_workers() -> int:
    """One uvicorn worker per two CPU cores this process may use, 1 to 4: the UI serves one person."""
    return max(1, min(4, len(os.sched_getaffinity(0)) // 2)) if hasattr(os, "sched_getaffinity") else 1


def sticky_view(base: str, url: str) -> str:
    """`url` through the landing page of `pipelines.ui_app`, which keeps the model-training view for the
    pages after it (MLflow drops the URL's workflowType at the first click)."""
    from urllib.parse import quote

    from pipelines.tracking import UI_LAND

    return f"{base.rstrip('/')}{UI_LAND}?to={quote(url[len(base.rstrip('/')) + 1:], safe='')}"


def landing_url(uri: str, base: str, study: str | None = None) -> str:
    """The runs of `study` (default: the newest study's parent run) in the model-training view; the
    experiment list when the store holds no study yet."""
    from pipelines import tracking as trk
    from pipelines.compare import find_parent

    client = trk.MlflowClient(uri)
    if study:
        return trk.runs_url(base, find_parent(client, study).info.experiment_id, client)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    newest = client.search_runs(exp_ids, f"tags.`{trk.TAG_ROLE}` = 'parent'", order_by=["attributes.start_time DESC"],
                                max_results=1) if exp_ids else []
    if not newest:  # no study yet: the newest run's experiment, or the list of experiments
        newest = client.search_runs(exp_ids, order_by=["attributes.start_time DESC"], max_results=1) if exp_ids else []
    return trk.runs_url(base, newest[0].info.experiment_id, client) if newest else f"{base}/#/experiments"


def _wait_http(base: str, timeout_s: float = 60.0) -> bool:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return True
        except OSError:
            time.sleep(0.5)
    return False


def _open(url: str, really: bool) -> None:
    if really:
        import webbrowser

        webbrowser.open(url)


if __name__ == "__main__":
    raise SystemExit(main())
