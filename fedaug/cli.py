"""The ``fedaug`` command line. Subcommands are thin: parse, validate, call into common/ client/ server/ simulations/.

Errors print one line to stderr, without a traceback. Exit 2: the command line itself is wrong (an unknown command or
flag, a missing required flag, a value not of the flag's type, flags that exclude each other), as click and most
command lines have it. Exit 1: what the data, a config or a flag's value says is wrong (a malformed file, a bad key,
a budget already spent), or a check failed (`validate`, `health`).
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import click
import typer
import typer.core
from packaging.version import Version
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedaug.common.errors import FedaugError
from fedaug.common.flower_logging import tame_flower_logging
from fedaug.common.memory import single_malloc_arena

# Help text is plain text: rich markup would swallow the TOML [section] names it cites. typer before 0.21.1 escapes
# its own "[required]" and "[default: 3]" for rich even then, printing "\[required]"; flwr keeps typer below 0.21,
# so typer is told here what is true of this app: help is not formatted by rich.
if Version(typer.__version__) < Version("0.21.1"):
    typer.core.HAS_RICH = False
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console(stderr=True)
"""Results, warnings and errors."""
progress_console = Console(stderr=True)
"""Progress bars, per-epoch and per-round lines and daemons' running commentary: silenced by ``--quiet``."""


FLAGS = {
    # The config key each command-line flag sets: a bad value is reported under the flag the user typed.
    "data.path": "--data", "data.format": "--format", "device": "--device", "model.kind": "--model",
    "model.catalog": "--catalog", "model.item_dim": "--item-dim", "train.epochs": "--epochs",
    "train.max_minutes": "--max-minutes", "train.seed": "--seed", "privacy.epsilon": "--epsilon",
    "privacy.delta": "--delta", "privacy.max_grad_norm": "--max-grad-norm",
    "privacy.grad_sample_mode": "--grad-sample-mode", "local.rounds": "--rounds",
    "local.local_epochs": "--local-epochs",
    "local.batch_size": "--batch-size", "local.lr": "--lr", "local.seed": "--seed", "augment.enabled": "--no-augment",
    "federation.rounds": "--rounds", "federation.strategy": "--strategy", "federation.seed": "--seed",
    "federation.metrics_port": "--metrics-port", "simulation.merchants": "--merchants",
    "simulation.partition": "--partition", "simulation.mode": "--mode", "simulation.attack": "--attack",
    "simulation.attackers": "--attackers", "simulation.defence": "--defence",
    "federation.compression": "--compression", "simulation.ray_address": "--ray-address",
    "simulation.client_cpus": "--client-cpus",
}

def main() -> None:
    single_malloc_arena()
    tame_flower_logging()  # also Ray's tip; Opacus' notes are settled where Opacus is set up (fedaug.client.trainer)
    warnings.formatwarning = _warning_line
    command = typer.main.get_command(app)
    if {"-h", "--help"} & set(sys.argv[1:]):
        _cite_config_defaults(command, sys.argv[1:])
    try:
        code = command.main(standalone_mode=False)  # click returns (not raises) the code of a typer.Exit here
    except FedaugError as exc:
        _error(str(exc))
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:
        console.print(exc.format_message(), highlight=False, markup=False)
        sys.exit(0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # a wrong flag or value: one line too, not click's usage box
        context = getattr(exc, "ctx", None)
        _error(_click_message(exc) + (f" (see {context.command_path} --help)" if context else ""))
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


CONFIG_KEY = re.compile(r"from \[([\w.]+)\] (\w+)")
"""How help cites a default that comes from a config key: "default: from [privacy] epsilon"."""


def _cite_config_defaults(group: click.Group, args: list[str]) -> None:
    """Add to the help of the command in ``args`` the value of each config key it cites ("default: from [privacy]
    epsilon" -> "default: from [privacy] epsilon, 8.0"): the defaults of the config models themselves, read only
    when help is asked for (they load torch)."""
    command = next((group.commands[a] for a in args if a in group.commands), None)
    cited = [p for p in (command.params if command else ()) if p.help and CONFIG_KEY.search(p.help)]
    if not cited:
        return
    from fedaug.common.config import BaselineConfig, FederationConfig, MerchantRunConfig

    def configs():  # the simulation's own tables last, only where cited: its module loads Flower
        yield from (MerchantRunConfig(), FederationConfig(), BaselineConfig())
        from fedaug.simulations.scenario import SimulationConfig

        yield SimulationConfig()

    def value(match: re.Match) -> str:
        path = [*match.group(1).split("."), match.group(2)]
        for node in configs():
            for name in path:
                node = getattr(node, name) if hasattr(node, name) else KeyError
                if node is KeyError:
                    break
            if node is not KeyError:
                shown = "" if node is None else f", {node:g}" if isinstance(node, float) else f", {node}"
                return match.group(0) + shown
        raise KeyError(f"help cites [{match.group(1)}] {match.group(2)}, which no config has")

    for param in cited:
        param.help = CONFIG_KEY.sub(value, param.help)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Our own warnings as one line addressed to the user, not a source location."""
    if category.__module__.split(".")[0] == "fedaug":
        return f"warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def _click_message(exc: click.ClickException) -> str:
    """click's message, with its "Did you mean" suggestion once (typer already writes one into the message)."""
    if getattr(exc, "possibilities", None) and "Did you mean" in exc.message:
        return exc.message
    return exc.format_message()


def _error(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from fedaug import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, per-round lines or daemon "
                                    "commentary: only results, warnings and errors.")) -> None:
    """Federated, privacy-preserving augmentation and training for sequential recommendation."""
    progress_console.quiet = quiet


@app.command()
def baseline(
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json."),
    config: Path | None = typer.Option(None, "--config", help="TOML file with data, model and train tables."),
    data: Path | None = typer.Option(None, "--data", help="Behaviour data file; default: embedded synthetic data."),
    fmt: str | None = typer.Option(None, "--format", help="events | amazon-seq (default: from the file suffix)."),
    model: str | None = typer.Option(None, "--model", help="sasrec | pop | text (the public text prior); default: "
                                        "from [model] kind"),
    epochs: int | None = typer.Option(None, "--epochs", help="Maximum training epochs; default: from [train] epochs."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Training time budget in minutes; default: "
                                             "from [train] max_minutes (none)."),
    seed: int | None = typer.Option(None, "--seed"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Train the centralised non-private reference model and write DIR/metrics.json."""
    from fedaug.common.config import load_config

    cfg = load_config(config, {
        "data.path": str(data) if data else None, "data.format": fmt, "model.kind": model, "train.epochs": epochs,
        "train.max_minutes": max_minutes, "train.seed": seed, "device": device,
    }, flags=FLAGS)
    _check_out_dir(out)
    from fedaug.simulations.baseline import run_baseline  # after validation: a bad flag fails fast

    with _progress() as progress:
        task = progress.add_task("training", total=None)

        def on_step(epoch, step, steps, loss):
            progress.update(task, description=f"epoch {epoch} loss {loss:.3f}", completed=step, total=steps)

        def on_epoch(record):
            progress.console.print(
                f"epoch {record['epoch']:3d}  loss {record['loss']:.4f}  "
                f"valid NDCG@10 {record['valid']['ndcg@10']:.4f}  HR@10 {record['valid']['hr@10']:.4f}"
            )

        metrics = run_baseline(cfg, out, on_step=on_step, on_epoch=on_epoch)
    test, fusion = metrics.test, metrics.fusion
    if fusion:
        console.print(f"{cfg.model.kind} alone: test NDCG@10 {fusion.model_test['ndcg@10']:.4f}; fused with the "
                      f"text prior at weight {fusion.weight:g} (chosen on validation):")
    cold = (f"cold-item targets ({metrics.cold_users} users) NDCG@10 {metrics.test_cold['ndcg@10']:.4f}  "
            if metrics.test_cold else "")
    console.print(
        f"{cfg.model.kind}{' + text prior' if fusion else ''}: test NDCG@10 {test['ndcg@10']:.4f}  "
        f"HR@10 {test['hr@10']:.4f}  AUC {test['auc']:.4f}  {cold}("
        f"{f'{metrics.epochs} epochs, ' if metrics.epochs else ''}{metrics.seconds:.0f} s) -> {out / 'metrics.json'}"
    )
    if metrics.test_by_type:
        console.print("by the test event's type: " + "  ".join(
            f"{kind} ({m['users']} users) NDCG@10 {m['ndcg@10']:.4f}" for kind, m in metrics.test_by_type.items()))


@app.command()
def status(
    state_dir: Path = typer.Option(..., "--state-dir", help="A merchant's or the aggregator's state folder, or a "
                                   "run's output folder: every privacy ledger and checkpoint under it is shown."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """ε spent per merchant and run, the federation's last round and model bundle, from ledgers and checkpoints."""
    import json

    from fedaug.client.ledger import LEDGER_FILE, ledger_status
    from fedaug.common.records import StatusReport, federation_name
    from fedaug.server.checkpoint import CHECKPOINT, federation_status

    if not state_dir.is_dir():
        raise FedaugError(f"--state-dir: {state_dir} is not a folder")

    def under(name: str) -> list[Path]:  # the folder itself and up to three levels below
        return sorted(p.parent for depth in range(4) for p in state_dir.glob("/".join(["*"] * depth + [name])))

    report = StatusReport(state_dir=str(state_dir), federations=[federation_status(d) for d in under(CHECKPOINT)],
                          ledgers=[ledger_status(d) for d in under(LEDGER_FILE)])
    if not report.federations and not report.ledgers:
        raise FedaugError(f"--state-dir: no privacy ledger or federation checkpoint under {state_dir}")
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    from rich.table import Table

    out = Console()
    for fed in report.federations:
        table = Table(title=f"{federation_name(fed.run_key, fed.flower_runs)} ({fed.state_dir})", show_header=False,
                      title_justify="left")
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")  # paths (the model bundle) are folded whole, never cut short
        table.add_row("last round", f"{fed.round}" + (f" (best validation: round {fed.best_round})"
                                                        if fed.best_round else ""))
        table.add_row("validation NDCG@10", "— (private merchants keep it)" if fed.valid_ndcg10 is None
                      else f"{fed.valid_ndcg10:.4f}")
        if fed.product:
            table.add_row("the model handed out", fed.product)
        if fed.selection_valid_ndcg10 is not None:
            table.add_row("its validation NDCG@10 (federated DP estimate)", f"{fed.selection_valid_ndcg10:.4f}")
        table.add_row("max ε of a merchant", "non-private" if fed.epsilon_max is None else f"{fed.epsilon_max:.3f}")
        table.add_row("model bundle", fed.model or "— (written when the run ends)")
        for name, epsilon in fed.merchants.items():
            table.add_row(name, "non-private" if epsilon is None or epsilon < 0 else f"ε {epsilon:.3f}")
        out.print(table)
    if report.ledgers:
        table = Table(title=f"privacy ledgers under {state_dir}", title_justify="left")
        for column in ("state dir", "ε spent", "δ", "rounds", "runs (rounds, ε after)", "last recorded"):
            table.add_column(column, overflow="fold")  # a narrow terminal folds a path whole, never cuts it short
        for ledger in report.ledgers:
            runs = "; ".join(f"{r.run_id[:12]} ({r.rounds}, {r.epsilon_after:.3f})" for r in ledger.runs)
            where = Path(ledger.state_dir).relative_to(state_dir).as_posix()  # under the title's folder
            table.add_row(where, f"{ledger.epsilon:.3f}", "—" if ledger.delta is None else
                          f"{ledger.delta:.2e}", str(ledger.rounds), runs or "—", ledger.last_recorded or "—")
        out.print(table)


@app.command()
def health(
    config: Path | None = typer.Option(None, "--config", help="The daemon's own TOML (`fedaug aggregator` or "
                                       "`fedaug merchant`): asks the address its [aggregator] or [merchant] "
                                       "health_address gives Flower."),
    address: str | None = typer.Option(None, "--address", help="Or the health service's host:port itself (keep it "
                                       "on loopback: it has no TLS)."),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to wait for the answer."),
) -> None:
    """Exit 0 while Flower's SuperLink (aggregator) or SuperNode (merchant) says it is serving, 1 otherwise: for
    container healthchecks. Give --config or --address. A daemon starts Flower's health service only where its
    config sets health_address (e.g. [aggregator] health_address = "127.0.0.1:9098")."""
    from fedaug.runtime.health import configured_address, serving
    from fedaug.runtime.processes import split_address

    if (config is None) == (address is None):
        raise click.UsageError("give one of --config (the daemon's TOML) and --address HOST:PORT")
    if not timeout > 0:
        raise FedaugError(f"--timeout: {timeout:g} must be above 0 seconds")
    flag = "--address" if config is None else str(config)
    address = address or configured_address(config)
    try:
        split_address(address, flag if config is None else f"{config}: health_address")
    except ValueError as exc:
        raise FedaugError(str(exc)) from None
    if not serving(address, timeout):
        raise FedaugError(f"{flag}: {address} is not serving (no SERVING answer within {timeout:g} s)")
    typer.echo(f"{address}: serving")


@app.command()
def validate(
    data: Path | None = typer.Option(None, "--data", help="Behaviour data file to check; default: from [data] path in "
                                     "--config."),
    config: Path | None = typer.Option(None, "--config", help="TOML whose [data] table maps the file's columns."),
    fmt: str | None = typer.Option(None, "--format", help="events | amazon-seq (default: from the file suffix)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a behaviour data file without training on it: counts, event types, time range, history lengths, users
    too short to evaluate, test targets tied in time with the event before, dropped and duplicate events, items a
    catalog does not know. Exit 1 on errors (with --json: {"ok": false, "errors": [...]} on stdout as well)."""
    import json

    from pydantic import BaseModel

    from fedaug.common.config import DataSection, load_config, read_toml

    class DataOnly(BaseModel):
        data: DataSection = DataSection()

    try:
        raw = {"data": read_toml(config).get("data", {})} if config is not None else {}
        section = load_config(None, {"data.path": str(data) if data else None, "data.format": fmt}, DataOnly,
                              flags=FLAGS, where=str(config) if config else None, raw=raw).data
        if section.path is None:
            raise click.UsageError("give the file to check: --data FILE (or [data] path in --config)")
        from fedaug.common.data.validate import check_data

        report = check_data(section)
    except (FedaugError, click.UsageError) as exc:
        if as_json:  # a malformed file or config is a report too: scripts read one JSON object either way
            typer.echo(json.dumps({"ok": False, "errors": [str(exc)]}, indent=2))
        raise
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_data_report(report)
    for error in report.errors:
        _error(error)
    if not report.ok:
        raise typer.Exit(1)


def _print_data_report(report) -> None:
    from rich.table import Table

    from fedaug.common.data.split import MIN_EVALUABLE

    out = Console()
    table = Table(title=f"{report.path} ({report.format})", show_header=False, title_justify="left")
    rows = [("users", f"{report.users:,}"), ("items", f"{report.items:,}"), ("events", f"{report.events:,}")]
    if report.events_by_type is not None:
        rows.append(("events by type", ", ".join(f"{k} {v:,}" for k, v in report.events_by_type.items() if v)))
    if report.first_event:
        rows.append(("time range", f"{report.first_event} .. {report.last_event}"))
    rows.append(("history lengths", ", ".join(f"{k}: {v:,}" for k, v in report.history_lengths.items())))
    rows.append(("too short to evaluate", f"{report.too_short:,} users (fewer than {MIN_EVALUABLE} events: trained "
                                          "on, not scored)"))
    if report.tied_test_share is not None:
        rows.append(("test target tied in time", f"{report.tied_test_targets:,} of {report.users - report.too_short:,} "
                     f"evaluated users ({report.tied_test_share:.0%}): their last event has the same time as the one "
                     "before it, so the file's order decides which is held out for test (ties are kept in file "
                     "order)"))
    if report.delimiter not in (None, ","):
        rows.append(("delimiter", f"{report.delimiter!r} (detected from the first line)"))
    if report.merchants is not None:
        rows.append(("merchants", str(report.merchants)))
    if report.context:
        rows.append(("context columns", ", ".join(report.context)))
    if report.dropped is not None:
        rows += [("dropped by [data.events]", f"{report.dropped:,}"), ("duplicate events", f"{report.duplicates:,}")]
    if report.unknown_catalog_items is not None:
        rows.append(("items not in the catalog", f"{report.unknown_catalog_items:,}"))
    for name, value in rows:
        table.add_row(escape(name), escape(value))
    out.print(table)


@app.command()
def local(
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json, report.md, plots, the model bundle "
                             "(and the ledger, unless --state-dir)."),
    config: Path | None = typer.Option(None, "--config", help="TOML: data, model, augment, privacy, local."),
    data: Path | None = typer.Option(None, "--data", help="This merchant's behaviour data; default: synthetic."),
    fmt: str | None = typer.Option(None, "--format", help="events | amazon-seq (default: from the file suffix)."),
    epsilon: str | None = typer.Option(None, "--epsilon", help="Total privacy budget ε, or 'inf' (non-private); "
                                       "default: from [privacy] epsilon."),
    delta: float | None = typer.Option(None, "--delta", help="δ; default: from [privacy] delta, else 1 / (10 × the "
                                       "users who can be trained on: two or more events besides the held-out ones)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Training rounds (noise is calibrated for all); "
                                      "default: from [local] rounds."),
    local_epochs: int | None = typer.Option(None, "--local-epochs", help="Epochs per round; default: from [local] "
                                            "local_epochs."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Expected users per DP step; default: from "
                                          "[local] batch_size."),
    lr: float | None = typer.Option(None, "--lr"),
    max_grad_norm: float | None = typer.Option(None, "--max-grad-norm", help="Per-user clipping norm C; "
                                             "default: from [privacy] max_grad_norm."),
    grad_sample_mode: str | None = typer.Option(None, "--grad-sample-mode", help="ghost | hooks"),
    no_augment: bool = typer.Option(False, "--no-augment", help="Train on the original sequences only."),
    catalog: bool | None = typer.Option(None, "--catalog/--no-catalog",
                                        help="Item features from the public catalog's attributes."),
    item_dim: int | None = typer.Option(None, "--item-dim", help="Width of learned per-item tables (0: none)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Where the privacy ledger lives (DIR/state)."),
    new_budget: bool = typer.Option(False, "--new-budget", help="Start a new privacy ledger even though another "
                                    "ledger has spent budget on this data (refused otherwise)."),
    trial: bool = typer.Option(False, "--trial", help="Try it without spending a real budget: the embedded synthetic "
                               "data (--config's [data] set aside) and a privacy ledger in a temporary folder."),
    seed: int | None = typer.Option(None, "--seed"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Train one merchant alone with the client's own DP trainer; DIR/report.md sets it beside the public text prior
    and popularity."""
    from fedaug.common.config import MerchantRunConfig, load_config

    cfg = load_config(config, {
        "data.path": str(data) if data else None, "data.format": fmt, "privacy.epsilon": epsilon,
        "privacy.delta": delta, "privacy.max_grad_norm": max_grad_norm, "privacy.grad_sample_mode": grad_sample_mode,
        "local.rounds": rounds, "local.local_epochs": local_epochs, "local.batch_size": batch_size, "local.lr": lr,
        "local.seed": seed, "augment.enabled": False if no_augment else None, "device": device,
        "model.catalog": catalog, "model.item_dim": item_dim,
    }, MerchantRunConfig, flags=FLAGS)
    _check_out_dir(out)
    trial_state = _trial(cfg, data, state_dir, new_budget) if trial else None
    if trial_state is not None:
        cfg, state_dir, new_budget = cfg.model_copy(update={"data": type(cfg.data)()}), Path(trial_state.name), None
    from fedaug.simulations.local import run_local  # after validation: a bad flag fails fast

    with _progress() as progress:
        task = progress.add_task("round 1 steps", total=None)
        rounds_done = 0

        def on_step(step, steps):
            progress.update(task, description=f"round {rounds_done + 1}/{cfg.local.rounds} steps", completed=step,
                            total=steps)

        def on_round(done, total, record):
            nonlocal rounds_done
            rounds_done = done
            progress.console.print(
                f"round {done:3d}/{total}  loss {record.train_loss:.4f}  ε {record.epsilon_max:.3f}  "
                f"valid NDCG@10 {record.valid['ndcg@10']:.4f}  ({record.seconds:.0f} s)")

        metrics = run_local(cfg, out, state_dir or out / "state", on_round=on_round, on_step=on_step,
                            new_budget=new_budget)
    _print_result(metrics, out, "local")


def _trial(cfg, data: Path | None, state_dir: Path | None, new_budget: bool):
    """`fedaug local --trial`: the temporary folder its ledger lives in (removed at exit), said before training."""
    import tempfile

    for flag, given in (("--data", data is not None), ("--state-dir", state_dir is not None),
                        ("--new-budget", new_budget)):
        if given:
            raise click.UsageError(f"{flag}: not with --trial (a trial runs on the embedded synthetic data with a "
                                   "throwaway ledger)")
    console.print("trial: the embedded synthetic data" + (" (--config's [data] set aside)" if cfg.data.path else "")
                  + "; its privacy ledger lives in a temporary folder, removed afterwards: no real data's budget is "
                  "spent or recorded", highlight=False, markup=False, soft_wrap=True)
    return tempfile.TemporaryDirectory(prefix="fedaug-trial-")


def _print_result(metrics, out: Path, label: str) -> None:
    """A finished run in three lines: its test figures, what needs no training beside them on the same users,
    and what the model handed out is — saying plainly where its trained parts add nothing — with the ε spent."""
    from fedaug.server.summary import attribute

    test, privacy = metrics.test, metrics.privacy
    private = privacy is not None and privacy.epsilon_max is not None and privacy.epsilon_max < float("inf")
    delta = privacy.delta if private and isinstance(privacy.delta, float) else None
    console.print(f"{label}: test NDCG@10 {test['ndcg@10']:.4f}  HR@10 {test['hr@10']:.4f}"
                  + (f"  δ {delta:.2g}" if delta is not None else "")
                  + f"  ({metrics.seconds:.0f} s) -> {out / 'report.md'}")
    beside = {name: m["ndcg@10"] for name, m in metrics.baselines.items()}
    if metrics.fusion is not None:
        beside["the trained model alone"] = metrics.fusion.model_test["ndcg@10"]
    gain = ((metrics.gain_over_text or {}).get("final") or {}).get("gain_over_text_prior")
    console.print("  beside it, test NDCG@10 on the same users: "
                  + "  ".join(f"{name} {value:.4f}" for name, value in beside.items())
                  + (f"  (gain over the text prior {gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}])"
                     if gain else ""))
    if metrics.best_test and metrics.selection != "private":
        console.print(f"  best-validation round {metrics.best_round}: test NDCG@10 "
                      f"{metrics.best_test['ndcg@10']:.4f}")
    console.print(attribute(metrics).line(), markup=False, highlight=False)


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Directory for metrics.json, report.md, plots and state/."),
    config: Path | None = typer.Option(None, "--config", help="TOML: data, model, augment, privacy, local, "
                                       "federation, simulation."),
    data: Path | None = typer.Option(None, "--data", help="Behaviour data file; default: embedded synthetic data."),
    fmt: str | None = typer.Option(None, "--format", help="events | amazon-seq (default: from the file suffix)."),
    merchants: int | None = typer.Option(None, "--merchants", help="Merchants to cut the data into; default: from "
                                         "[simulation] merchants."),
    partition: str | None = typer.Option(None, "--partition", help="uniform | category | column"),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds (merchants plan their ε for all); "
                                      "default: from [federation] rounds."),
    local_epochs: int | None = typer.Option(None, "--local-epochs", help="Local epochs per round; default: from "
                                            "[local] local_epochs."),
    epsilon: str | None = typer.Option(None, "--epsilon", help="ε budget per merchant, or 'inf' (non-private); "
                                       "default: from [privacy] epsilon."),
    no_augment: bool = typer.Option(False, "--no-augment", help="Merchants train on their original sequences."),
    strategy: str | None = typer.Option(None, "--strategy", help="fedavg | fedprox | fedadam | fedyogi | "
                                        "fedtrimmedavg | fedmedian | krum | multikrum"),
    mode: str | None = typer.Option(None, "--mode", help="federated | local (each merchant alone) | central "
                                    "(all data pooled), all under the same DP settings."),
    seed: int | None = typer.Option(None, "--seed"),
    attack: str | None = typer.Option(None, "--attack", help="Byzantine merchants: scale | signflip | noise | "
                                      "labelflip (robustness experiments)."),
    attackers: float | None = typer.Option(None, "--attackers", help="Fraction of merchants that attack."),
    defence: str | None = typer.Option(None, "--defence", help="none | trimmed | median | multikrum | normbound "
                                       "(sets the strategy; normbound clips updates to the median distance)."),
    baseline: list[Path] = typer.Option([], "--baseline", help="metrics.json of `fedaug baseline` runs to compare "
                                        "with in the report (repeatable)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Serve Prometheus /metrics on this port."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
    compression: str | None = typer.Option(None, "--compression", help="How merchants send updates: none | fp16 | "
                                           "int8 (the delta from the global model)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Join this running Ray cluster (auto or "
                                           "HOST:PORT) instead of starting Ray here."),
    client_cpus: int | None = typer.Option(None, "--client-cpus", help="CPUs per simulated merchant."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's own logs."),
) -> None:
    """Run the ServerApp and ClientApp in Flower's simulation engine over merchants cut from one data set."""
    from fedaug.common.config import load_config
    from fedaug.simulations.scenario import SimulationConfig

    cfg = load_config(config, {
        "data.path": str(data) if data else None, "data.format": fmt, "simulation.merchants": merchants,
        "simulation.partition": partition, "federation.rounds": rounds, "local.local_epochs": local_epochs,
        "privacy.epsilon": epsilon, "augment.enabled": False if no_augment else None,
        "federation.strategy": strategy, "simulation.mode": mode, "federation.seed": seed,
        "federation.metrics_port": metrics_port, "device": device, "simulation.attack": attack,
        "simulation.attackers": attackers, "simulation.defence": defence, "federation.compression": compression,
        "simulation.ray_address": ray_address, "simulation.client_cpus": client_cpus,
    }, SimulationConfig, flags=FLAGS)
    baselines = dict(_read_baseline(path) for path in baseline)
    _check_out_dir(out)
    from fedaug.simulations.simulate import finished_run, run_simulate  # after validation: a bad flag fails fast

    done = finished_run(cfg, out)
    if done is not None:
        console.print(f"{out} holds this run, finished (its metrics.json has these very settings): not run again. "
                      f"Its result (report: {out / 'report.md'}; for a fresh run, give another --out):",
                      markup=False, highlight=False)
        _print_result(done, out, done.mode)
        return
    with _progress() as progress:
        unit = "merchants" if cfg.simulation.mode == "local" else "rounds"
        task = progress.add_task(f"{cfg.simulation.mode}: {unit}", total=None)

        def on_round(done, total, record):
            progress.update(task, completed=done, total=total)
            if record and record.valid:
                progress.console.print(f"round {done:3d}/{total}  valid NDCG@10 {_round_validation(record)}"
                                       + (f"  max ε {record.epsilon_max:.3f}" if record.epsilon_max else "")
                                       + (f"  ({record.seconds:.0f} s)" if record.seconds else ""))

        metrics = run_simulate(cfg, out, on_round=on_round, baselines=baselines, verbose=verbose)
    _print_result(metrics, out, metrics.mode)


def _round_validation(record) -> str:
    """A round's validation figure; where the central evaluation composed the model with the prior, the model
    alone beside it (a private run composes it at prior weight inf every round: the prior with the statistics, a
    flat line, while the model itself may be learning)."""
    valid = record.valid["ndcg@10"]
    if record.fusion_weight is None or not record.model_valid:
        return f"{valid:.4f}"
    composed = ("prior + statistics" if math.isinf(record.fusion_weight)
                else f"fused at prior weight {record.fusion_weight:g}")
    return f"model alone {record.model_valid['ndcg@10']:.4f}, {composed} {valid:.4f}"


@app.command()
def recommend(
    model: Path = typer.Option(..., "--model", help="A model bundle directory (RUN/model)."),
    history: str | None = typer.Option(None, "--history",
                                       help='One shopper\'s history, shop item ids oldest first: "a b c".'),
    users: Path | None = typer.Option(None, "--users",
                                      help="Batch: an events CSV/Parquet or amazon-seq file of histories."),
    fmt: str | None = typer.Option(None, "--format", help="--users format: events | amazon-seq (from the suffix)."),
    config: Path | None = typer.Option(None, "--config", help="TOML whose [data.columns] / [data.events] map the "
                                       "--users file's columns and event names (default: the mapping the bundle "
                                       "was trained with)."),
    out: Path | None = typer.Option(None, "--out", help="Batch: the CSV to write (default: stdout)."),
    k: int = typer.Option(10, "-k", "--k", help="How many items to recommend."),
    query: str | None = typer.Option(None, "--query", help="A search query: personalised search over the catalog."),
    explain: bool = typer.Option(False, "--explain", help="Show the history items behind each recommendation."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    include_seen: bool = typer.Option(False, "--include-seen", help="Allow items already in the history."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Recommend (or search) for one history or a file of them with a model bundle. Without --history and --users:
    a new visitor (--query: plain search; none: the bundle's popular items)."""
    if history is not None and users is not None:
        raise click.UsageError("give one of --history and --users, not both")
    from fedaug.common.recommend.recommender import Recommender

    recommender = Recommender.load(model, device=device, schema=_shop_schema(config))
    if users is None:
        results = recommender.recommend((history or "").split(), k=k, query=query, explain=explain,
                                        exclude_seen=not include_seen)
        if not results and not history:
            console.print(f"no recommendations: {Recommender.why_empty(query)}"
                          + ("" if query else " (give --query or --history)"), highlight=False)
        _print_recommendations(results, as_json)
        return
    from fedaug.serving.batch import recommend_file

    with _progress() as progress:
        task = progress.add_task("recommending", total=None)
        written = recommend_file(recommender, users, out, fmt=fmt, k=k, query=query,
                                 exclude_seen=not include_seen,
                                 on_batch=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"{written} users -> {out or 'stdout'}")


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", help="A model bundle directory (RUN/model, a merchant's STATE/model)."),
    data: Path | None = typer.Option(None, "--data", help="Behaviour data to test on, in the shop's item ids "
                                     "(default: [data] path in --config, else the embedded synthetic data)."),
    fmt: str | None = typer.Option(None, "--format", help="events | amazon-seq (default: from the file suffix)."),
    config: Path | None = typer.Option(None, "--config", help="TOML whose [data] table maps the file's columns and "
                                       "whose [text] table builds a text prior from the data's item texts when the "
                                       "bundle holds none (other tables are not read)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Test a model bundle on your own data, locally: its test NDCG@10 / HR@10 (leave-one-out, full ranking) beside
    the public text prior and popularity, and its paired gain over the prior."""
    import json

    from fedaug.common.data.source import load_data
    from fedaug.common.model.device import pick_device
    from fedaug.common.recommend.bundle import load_bundle
    from fedaug.common.recommend.check import check_model, read_check_config

    cfg = read_check_config(config, {"data.path": str(data) if data else None, "data.format": fmt,
                                     "device": device}, flags=FLAGS)
    run_device = pick_device(cfg.device)
    bundle = load_bundle(model, device=run_device)  # first: a wrong --model fails before the data is read
    with _progress() as progress:
        task = progress.add_task("loading the data", total=None)
        loaded = load_data(cfg.data, cfg.synthetic)
        result = check_model(bundle, loaded, text=cfg.text if config is not None else None, device=run_device,
                             source=cfg.data.path or "the embedded synthetic data",
                             on_stage=lambda name: progress.update(task, description=f"testing: {name}"))
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    _print_model_check(result, model)


def _print_model_check(result, model: Path) -> None:
    from rich.table import Table

    from fedaug.common.recommend.check import gain_text

    kind = result.bundle["kind"]
    table = Table(title=f"{model} ({kind}) on {result.test['users']:,} held-out users", title_justify="left")
    for column in ("scorer", "NDCG@10", "HR@10", "users"):
        table.add_column(column, justify="left" if column == "scorer" else "right")
    prior = {"bundle": "text prior (the bundle's)", "data": "text prior (the data's texts)"}.get(
        result.prior_source, "text prior")
    for name, m in (("model", result.test), (prior, result.text_prior), ("popularity", result.popularity)):
        if m is not None:
            table.add_row(escape(name), f"{m['ndcg@10']:.4f}", f"{m['hr@10']:.4f}", f"{m['users']:,}")
    out = Console()
    out.print(table)
    if result.gain_over_text_prior is None:
        out.print("no text prior to compare with (the bundle holds none; --config with a [text] table builds one from "
                  "the data's item texts)", highlight=False, soft_wrap=True)
    else:
        out.print(f"gain over the text prior, test NDCG@10 per user: {gain_text(result)} (mean, 95 % paired "
                  "interval)", highlight=False, soft_wrap=True)


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="A model bundle directory (RUN/model); a new one is picked up."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Most requests scored in one forward pass."),
    max_wait_ms: float = typer.Option(0.5, "--max-wait-ms", min=0, help="How long a request waits for others."),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1,
                                       help="Largest request body taken (413 beyond)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="One line per request on stderr."),
    config: Path | None = typer.Option(None, "--config", help="TOML whose [data.events] / [data.columns] "
                                       "timestamp_unit say how requests name events and times (default: the "
                                       "mapping the bundle was trained with)."),
) -> None:
    """Serve recommendations and search over HTTP (FastAPI): /v1/recommend, /v1/search, /docs, / to try it."""
    import copy
    import socket

    import uvicorn

    from fedaug.serving.http import create_app

    application = create_app(model, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_body_bytes=max_body_bytes, schema=_shop_schema(config))
    try:  # the port is ours before we say we serve on it
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as exc:
        raise FedaugError(f"--port: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    bound = listener.getsockname()[1]
    console.print(f"serving {model} on http://{host}:{bound}/ (OpenAPI at /docs)", highlight=False)
    logging = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    logging["loggers"]["uvicorn.error"]["level"] = "WARNING"  # no start-up chatter; the access log stays
    config = uvicorn.Config(application, log_config=logging, log_level=None, access_log=access_log)
    uvicorn.Server(config).run(sockets=[listener])


def _shop_schema(config: Path | None):
    """The event-file mapping of ``config``'s [data] table (None: no --config, the bundle's own)."""
    if config is None:
        return None
    from fedaug.common.data.source import event_schema
    from fedaug.common.recommend.check import read_check_config

    return event_schema(read_check_config(config, {}, flags=FLAGS).data)


def _print_recommendations(results, as_json: bool) -> None:
    if as_json:
        import json

        typer.echo(json.dumps([r.to_json() for r in results], indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(show_lines=any(r.because for r in results))
    for column in ("#", "item", "title", "score", *(("because",) if results and results[0].because is not None
                                                    else ())):
        table.add_column(column)
    for rank, r in enumerate(results, start=1):
        row = [str(rank), r.item, r.title or "", f"{r.score:.3f}"]
        if r.because is not None:
            row.append("\n".join(f"{b.item} {b.contribution:+.3f}" + (f" {b.title[:40]}" if b.title else "")
                                 for b in r.because[:3]))
        table.add_row(*row)
    Console().print(table)


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", help="TOML: [sweep] grid (epsilon, augment, modes) plus the base "
                                "simulation tables."),
    out: Path = typer.Option(..., "--out", help="Directory: one subdirectory per run, sweep.json, report.md."),
    baseline: list[Path] = typer.Option([], "--baseline", help="metrics.json of `fedaug baseline` runs to compare "
                                        "with (repeatable)."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing; report the runs finished so far."),
) -> None:
    """Run a grid of simulations (ε × augmentation × mode) and write one report with a privacy–utility plot."""
    from fedaug.simulations.sweep import load_sweep, run_sweep

    grid, base = load_sweep(config)
    baselines = dict(_read_baseline(path) for path in baseline)
    _check_out_dir(out)
    with _progress() as progress:
        runs = progress.add_task("sweep", total=None)
        rounds = progress.add_task("rounds", total=None)

        def on_run(i, total, name):
            progress.update(runs, description=f"sweep: {name}", completed=i, total=total)
            progress.reset(rounds)

        def on_round(done, total, record):
            progress.update(rounds, completed=done, total=total)

        summary = run_sweep(grid, base, out, baselines, on_run=on_run, on_round=on_round, report_only=report_only)
    best = max(summary["runs"], key=lambda r: r["test"]["ndcg@10"])
    console.print(f"sweep: {len(summary['runs'])} runs; best test NDCG@10 {best['test']['ndcg@10']:.4f} "
                  f"({best['name']})  ({summary['seconds']:.0f} s) -> {out / 'report.md'}")


@app.command()
def audit(
    out: Path = typer.Option(..., "--out", help="Directory for audit.json, audit.png and state/."),
    config: Path | None = typer.Option(None, "--config", help="TOML: data, model, augment, privacy, local "
                                       "(with --federated also federation, simulation)."),
    data: Path | None = typer.Option(None, "--data", help="Behaviour data the canaries join; default: synthetic."),
    fmt: str | None = typer.Option(None, "--format", help="events | amazon-seq (default: from the file suffix)."),
    epsilon: str | None = typer.Option(None, "--epsilon", help="The privacy budget ε to audit, or 'inf'; default: "
                                       "from [privacy] epsilon."),
    canaries: int = typer.Option(1000, "--canaries", help="Canary users, each trained on with probability 1/2."),
    guesses: int | None = typer.Option(None, "--guesses", help="Canaries guessed in/out (default: canaries / 5)."),
    canary_length: int = typer.Option(20, "--canary-length", help="Items per canary chain."),
    rounds: int | None = typer.Option(None, "--rounds", help="Training rounds (noise is calibrated for all); "
                                      "default: from [local] rounds (--federated: [federation] rounds)."),
    federated: bool = typer.Option(False, "--federated", help="Through the federated path: the canaries join one "
                                   "simulated merchant and the final global model is scored."),
    merchants: int | None = typer.Option(None, "--merchants", help="With --federated: merchants to cut the data into."),
    canary_merchant: int = typer.Option(0, "--canary-merchant", help="With --federated: the merchant (0-based) "
                                        "whose users the canaries join."),
    seed: int = typer.Option(0, "--seed", help="Seed of the canaries and of who is included."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Audit ε empirically in one training run (Steinke, Nasr & Jagielski 2023): canaries in or out, guessed."""
    from fedaug.common.config import load_config
    from fedaug.simulations.audit import run_audit, run_federated_audit

    overrides = {"data.path": str(data) if data else None, "data.format": fmt, "privacy.epsilon": epsilon,
                 "device": device}
    if federated:
        from fedaug.simulations.scenario import SimulationConfig

        cfg = load_config(config, overrides | {"federation.rounds": rounds, "simulation.merchants": merchants},
                          SimulationConfig, flags=FLAGS)
        total = cfg.federation.rounds
    else:
        from fedaug.common.config import MerchantRunConfig

        if merchants is not None:
            raise click.UsageError("--merchants: only with --federated (the merchant path trains one merchant)")
        cfg = load_config(config, overrides | {"local.rounds": rounds}, MerchantRunConfig, flags=FLAGS)
        total = cfg.local.rounds
    _check_out_dir(out)
    with _progress() as progress:
        task = progress.add_task("training with canaries: rounds", total=total)
        kwargs = {"guesses": guesses, "canary_length": canary_length, "seed": seed,
                  "on_round": lambda done, total, _: progress.update(task, completed=done, total=total)}
        if federated:
            result = run_federated_audit(cfg, canaries, out, canary_merchant=canary_merchant, **kwargs)
        else:
            result = run_audit(cfg, canaries, out, **kwargs)
    console.print(f"audit: ε claimed {result['epsilon_claimed']}, empirical lower bound "
                  f"{result['epsilon_lower_bound']} at 95% ({result['correct']}/{result['guesses']} guesses right, "
                  f"{result['canaries']} canaries) -> {out / 'audit.json'}", highlight=False)


@app.command()
def certs(
    out: Path = typer.Option(..., "--out", help="New directory for ca.crt/.key, server.crt/.key, merchant-N.key/.pub."),
    merchants: int = typer.Option(3, "--merchants", help="Merchant authentication key pairs to create."),
    host: list[str] = typer.Option([], "--host", help="Extra DNS name or IP the SuperLink is reached at "
                                   "(repeatable; localhost, 127.0.0.1 and ::1 are always in)."),
) -> None:
    """Create a trial CA, the SuperLink's TLS certificate and merchant key pairs (production: your own CA)."""
    from fedaug.runtime.certs import write_certificates

    files = write_certificates(out, merchants, tuple(host))
    console.print(f"wrote {len(files)} files to {out}: {', '.join(f.name for f in files)}")


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="New directory for catalog.tsv and merchant-N.csv."),
    merchants: int = typer.Option(3, "--merchants", help="Merchants to generate (each gets its own users)."),
    users: int | None = typer.Option(None, "--users", help="Users in all; default: the embedded synthetic data's, "
                                     "from [synthetic] users."),
    data: Path | None = typer.Option(None, "--data", help="A real data set to cut into merchants' files (its users "
                                     "split uniformly at random); default: the embedded synthetic data."),
    fmt: str | None = typer.Option(None, "--format", help="events | amazon-seq (default: from the file suffix)."),
    seed: int = typer.Option(0, "--seed"),
    titles: bool = typer.Option(True, "--titles/--no-titles", help="Synthetic items get public titles (the text "
                                "prior and DP statistics then apply)."),
) -> None:
    """Write trial merchants' files: the public catalog (ids, titles where the data has them, attributes) and one
    events CSV each, from the embedded synthetic data or a real data set (--data)."""
    from fedaug.common.config import SyntheticSection, load_config
    from fedaug.common.data.source import load_data
    from fedaug.common.data.split import assign_merchants
    from fedaug.common.data.synthetic import generate
    from fedaug.runtime.export import write_merchant_files

    if data is None and fmt is not None:
        raise click.UsageError("--format: applies to --data only")
    if data is not None and users is not None:
        raise click.UsageError("--users: applies to the synthetic data only (--data cuts the whole data set)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedaugError(f"--out: {out} exists and is not an empty directory")
    if data is None:
        source = generate(SyntheticSection(**{"merchants": merchants, "seed": seed, "titles": titles}
                                           | ({"users": users} if users else {})))
    else:  # loaded as every command loads it (sibling files included), users split as `fedaug simulate` splits
        section = load_config(None, {"data.path": str(data), "data.format": fmt}, flags=FLAGS).data
        source = assign_merchants(load_data(section), merchants, "uniform", seed)
    files = write_merchant_files(source, out)
    console.print(f"wrote {', '.join(f.name for f in files)} to {out}: {source.n_users} users, {source.n_items} "
                  f"items{', with item titles' if source.catalog.texts else ''}")


@app.command()
def prepare(
    reviews: Path = typer.Option(..., "--reviews", help="Amazon reviews, JSON lines, .gz or not (2014: "
                                 "reviews_Beauty_5.json.gz; 2018: Beauty_5.json.gz)."),
    meta: Path = typer.Option(..., "--meta", help="Its metadata: meta_Beauty.json.gz (titles, brands, categories)."),
    out: Path = typer.Option(..., "--out", help="New directory for NAME.txt, NAME_time.txt, "
                             "NAME_item_attributes_named.tsv and NAME_item_titles.tsv (--format amazon-seq)."),
    name: str | None = typer.Option(None, "--name", help="The files' stem (default: from the reviews file, Beauty)."),
    core: int = typer.Option(5, "--core", help="Keep users and items with at least this many reviews (k-core)."),
    attribute_core: int = typer.Option(5, "--attribute-core", help="Keep brands and categories at least this many "
                                       "items share."),
) -> None:
    """Turn the public Amazon review and metadata files into the amazon-seq files every command reads."""
    from fedaug.common.data.prepare import prepare as prepare_amazon

    result = prepare_amazon(reviews=reviews, meta=meta, out=out, name=name, core=core,
                            attribute_core=attribute_core)
    console.print(f"wrote {', '.join(f.name for f in result.files)} to {out}: {result.users:,} users, "
                  f"{result.items:,} items, {result.events:,} events; {result.titled:,} items with a title, "
                  f"{result.attributes:,} brands and categories", highlight=False, soft_wrap=True)
    if result.expected is not None:
        users, items, events = result.expected
        same = result.expected == (result.users, result.items, result.events)
        console.print(f"expected for {reviews.name}: {users:,} users, {items:,} items, {events:,} events — "
                      + ("matches" if same else "DIFFERS: check the file"), highlight=False, soft_wrap=True)
    console.print(f"use it with: --data {result.files[0]} --format amazon-seq", highlight=False, soft_wrap=True)


@app.command()
def aggregator(
    config: Path = typer.Option(..., "--config", help="TOML: [aggregator], [federation], [data] catalog and the "
                                "training recipe ([model], [augment], [privacy], [local])."),
) -> None:
    """Run the aggregation service: Flower's SuperLink with TLS and merchant authentication, our ServerApp."""
    from fedaug.common.config import load_config
    from fedaug.server.aggregator import Aggregator, AggregatorConfig

    cfg = load_config(config, None, AggregatorConfig)
    _exit_cleanly_on_sigterm()
    with _progress() as progress:
        task = progress.add_task("rounds", total=cfg.federation.rounds)

        def on_round(done, total, record):
            progress.update(task, completed=done, total=total)
            if record:
                valid = (f"valid NDCG@10 {record.federated_valid['ndcg@10']:.4f}" if record.federated_valid
                         else "validation withheld (private merchants)")
                progress.console.print(f"round {done:3d}/{total}  merchants {record.participants}  {valid}"
                                       + (f"  max ε {record.epsilon_max:.3f}" if record.epsilon_max else ""))

        metrics = Aggregator(cfg, on_round, say=_plain(progress.console)).run()
    test = (f"test NDCG@10 {metrics.test['ndcg@10']:.4f}  HR@10 {metrics.test['hr@10']:.4f}" if metrics.test
            else "test metrics withheld (private merchants)")
    from fedaug.common.records import federation_name
    from fedaug.server.checkpoint import handed_out_estimate
    from fedaug.server.summary import attribute

    console.print(f"{federation_name(metrics.run_key, metrics.flower_runs)} done: {len(metrics.rounds)} rounds, "
                  f"{test} -> {cfg.aggregator.state_dir / 'report.md'}", markup=False, highlight=False)
    estimate = handed_out_estimate((metrics.parts or {}).get("model", {}).get("evaluation"))
    console.print(attribute(metrics).line()
                  + (f"; its validation NDCG@10 {estimate:.4f} (federated DP estimate)" if estimate is not None
                     else ""),
                  markup=False, highlight=False)
    for name, node in sorted(metrics.merchant_keys.items()):
        eps = next((m.epsilon for m in metrics.merchants if str(m.node) == node), None)
        console.print(f"  {name}: node {node}, ε spent {'—' if eps is None else f'{eps:.3f}'}")


@app.command()
def merchant(
    config: Path = typer.Option(..., "--config", help="TOML: [merchant] (SuperLink, certificate, key, state), "
                                "[data] (file, catalog), [privacy] (ε budget, δ)."),
) -> None:
    """Run a merchant daemon: check the data, then keep Flower's SuperNode with our ClientApp connected."""
    from fedaug.client.daemon import MerchantDaemon, MerchantDaemonConfig
    from fedaug.common.config import load_config

    cfg = load_config(config, None, MerchantDaemonConfig)
    _exit_cleanly_on_sigterm()
    raise typer.Exit(MerchantDaemon(cfg, say=_plain(progress_console)).run())


def _plain(out: Console):
    """Print Flower's messages as they are ("[code: 2004]" is not rich markup)."""
    return lambda text: out.print(text, markup=False, highlight=False)


def _exit_cleanly_on_sigterm() -> None:
    """Daemons stop their Flower processes on SIGTERM (docker stop, systemd) as on Ctrl+C."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _read_baseline(path: Path) -> tuple[str, dict]:
    import json

    from fedaug.simulations.report import METRIC_KEYS

    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        kind = metrics["config"]["model"]["kind"]
        test = {k: float(metrics["test"][k]) for k in METRIC_KEYS}
    except FileNotFoundError:
        raise FedaugError(f"--baseline: {path}: no such file") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FedaugError(f"--baseline: {path}: not a fedaug baseline metrics.json ({exc.__class__.__name__}: "
                          f"{exc})") from None
    return ("centralised non-private" if kind == "sasrec" else kind), test


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FedaugError(f"--out: {out} exists and is not a directory")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=progress_console, transient=True)
