"""``posguard-server train`` and ``evaluate``, and the training flags ``retrain`` shares with them."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from posguard_server.cli.command import OperatorCommand
from posguard_server.cli.stores import opened, risk_stores
from posguard_server.config import Settings

if TYPE_CHECKING:
    from posguard_models.training_config import TrainingConfig


def training_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The forest sizes, as flags whose defaults are :class:`TrainingConfig`'s."""
    from posguard_models.training_config import TrainingConfig  # not .training: no scikit-learn at start-up

    defaults = TrainingConfig()
    options = [
        click.option(
            "--n-estimators",
            type=click.IntRange(min=1),
            default=defaults.n_estimators,
            show_default=True,
            help="Trees of the global forest.",
        ),
        click.option(
            "--customer-estimators",
            type=click.IntRange(min=1),
            default=defaults.customer_estimators,
            show_default=True,
            help="Trees of each customer's forest.",
        ),
        click.option(
            "--customer-min-history",
            type=click.IntRange(min=2),
            default=defaults.customer_min_history,
            show_default=True,
            help="Training rows a customer needs for an own model.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def training_config(seed: int, flags: dict[str, Any]) -> TrainingConfig:
    from posguard_models.training_config import TrainingConfig

    return TrainingConfig(
        seed=seed,
        n_estimators=flags["n_estimators"],
        customer_estimators=flags["customer_estimators"],
        customer_min_history=flags["customer_min_history"],
    )


@click.command(cls=OperatorCommand)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--no-activate", is_flag=True, help="Register the models as candidates without activating them."
)
@training_options
@click.pass_obj
def train(settings: Settings, /, seed: int, no_activate: bool, **flags: Any) -> None:
    """Fit the global and per-customer models on stored history and activate them (servers pick them up)."""
    from posguard_server.pipeline.trainer import train_and_register

    with opened(settings, risk_stores) as risk:
        started = time.perf_counter()
        with click.progressbar(
            length=1,
            label="training customer models",
            show_pos=True,
            file=sys.stderr,
            hidden=not sys.stderr.isatty(),  # off a terminal, stdout and stderr are for scripts
        ) as bar:

            def progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(done - bar.pos)

            try:
                report = train_and_register(
                    risk.history,
                    risk.registry,
                    training_config(seed, flags),
                    activate=not no_activate,
                    progress=progress,
                )
            except ValueError as error:
                raise click.ClickException(str(error)) from None
    state = "active" if report.activated else "candidate"
    click.echo(
        f"version {report.version} ({state}): {report.rows} transactions of {report.customers} customers, "
        f"{report.customer_models} customer models, {report.labelled_fraud} labelled fraud left out, "
        f"{time.perf_counter() - started:.1f}s"
    )


@click.command(cls=OperatorCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--seeds", default="0,1,2", show_default=True, help="Comma-separated training seeds to average."
)
@click.option(
    "--labels/--no-labels",
    default=False,
    show_default=True,
    help="Feed fraud labels back through ReportOutcome, --label-delay-days late.",
)
@click.option("--label-delay-days", type=click.FloatRange(min=0), default=7.0, show_default=True)
@click.option(
    "--customers",
    "customers_limit",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate on this many customers only (a quick, bounded run).",
)
@click.option(
    "--through-server",
    is_flag=True,
    help="Replay through a real server on a fresh embedded database per seed (same numbers, ~6x slower).",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes fitting the customer forests (not with --through-server).",
)
@click.option(
    "--rules-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A TOML rules file (as for `rules backtest`): also report what its rules do on the test days, "
    "on top of the decisions the configured risk thresholds give.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print JSON lines: {"seed_result": ...} as each seed finishes, then the whole report.',
)
@training_options
@click.pass_obj
def evaluate(
    settings: Settings,
    /,
    file: Path,
    seeds: str,
    labels: bool,
    label_delay_days: float,
    customers_limit: int | None,
    through_server: bool,
    jobs: int,
    rules_file: Path | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Run the evaluation protocol on a labelled CSV: import history, train, replay the rest, measure.

    Computed directly with the server's validation, training, features and scorers, which give the answers a
    server would; with --through-server each seed runs on its own fresh embedded database and a real server
    on loopback.
    """
    from posguard_server.cli.rules import read_rules_file
    from posguard_server.pipeline.evaluate import evaluate as run
    from posguard_server.scoring import Thresholds

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter("must be integers separated by commas", param_hint="--seeds") from None

    def progress(stage: str, done: int, total: int) -> None:
        if not as_json:
            click.echo(f"\r{stage}: {done}/{total}   ", nl=False, err=True)

    result = run(
        file,
        seeds=seed_list,
        labels=labels,
        label_delay_days=label_delay_days,
        customers_limit=customers_limit,
        training=training_config(0, flags),
        progress=progress,
        through_server=through_server,
        jobs=jobs,
        on_seed=(lambda seed: click.echo(json.dumps({"seed_result": seed.as_dict()}))) if as_json else None,
        rules=read_rules_file(rules_file) if rules_file is not None else (),
        # The rules' effect is read against the decisions and local times this installation is set to.
        thresholds=Thresholds(review=settings.risk_review_threshold, decline=settings.risk_decline_threshold),
        time_zone=settings.policy_time_zone,
    )
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo("", err=True)
    mean = result.mean()
    click.echo(f"{result.dataset} ({'with' if labels else 'without'} label feedback), seeds {seeds}:")
    click.echo(
        f"  AP {mean['ap']:.3f} ± {mean['ap_std']:.3f}   ROC-AUC {mean['roc_auc']:.3f}   "
        f"recall@1% {mean['recall_at_1pct']:.3f}"
    )
    for key in sorted(k for k in mean if k.startswith("scenario_") and k.endswith("_ap")):
        scenario = key.split("_")[1]
        click.echo(
            f"  scenario {scenario}: AP {mean[key]:.3f}   "
            f"recall@1% {mean[f'scenario_{scenario}_recall_at_1pct']:.3f}"
        )
    click.echo(
        "  share at or above "
        + ", ".join(
            f"{k.removeprefix('at_or_above_')}: {v:.4f}" for k, v in mean.items() if k.startswith("at_or_")
        )
        + f"; {mean['distinct_scores']:.0f} distinct scores, the commonest {mean['most_common_share']:.1%}"
    )
    for seed in result.seeds:
        click.echo(
            f"  seed {seed.seed}: AP {seed.overall.average_precision:.3f} ROC-AUC {seed.overall.roc_auc:.3f} "
            f"recall@1% {seed.overall.recall_at_alert_rate:.3f}; "
            f"{seed.scored} scored, {seed.refused} refused; "
            + ", ".join(f"{k} {v:.0f}s" for k, v in seed.seconds.items())
        )
        if seed.rules is not None:
            effect = seed.rules
            precision = effect.fraud_hits / effect.hits if effect.hits else 0.0
            click.echo(
                f"    rules: {effect.hits} hits of {effect.transactions} test transactions, "
                f"{effect.fraud_hits} of them fraud (precision {precision:.3f}, "
                f"{effect.fraud_hits / max(1, effect.fraud):.3f} of {effect.fraud} frauds); "
                f"{effect.decisions_changed} decisions changed ({effect.declines} declines and "
                f"{effect.reviews} reviews in all)"
            )
