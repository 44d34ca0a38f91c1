"""``catsdogs tune``: Optuna search over training hyperparameters, on train/val only.

Every trial is an ordinary ``catsdogs train`` run (:class:`catsdogs.train.Trainer`) in its own folder
``OUT/trials/NNNN``; its per-epoch validation accuracy is reported to Optuna, and a median pruner
stops trials that fall behind. The test split is never read. Outputs: ``best_config.json`` (a
TrainConfig file for ``catsdogs train --config`` or ``catsdogs run --train-config``), ``study.csv``
(one row per trial) and ``optimization_history.png``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

from catsdogs import rundir, schema
from catsdogs.config import TrainConfig, TuneConfig, build_config, check_required, need, save_config, to_dict
from catsdogs.errors import ConfigError
from catsdogs.io.atomic import atomic_write_text
from catsdogs.models.registry import pretrained_names
from catsdogs.shards.manifest import load_manifest
from catsdogs.track.lineage import TAG_PREFIX, data_tags, git_tags
from catsdogs.track.mlflow_run import ending, open_run
from catsdogs.track.registry import tracking_uri
from catsdogs.train.loop import Trainer
from catsdogs.train.tracking import log_epoch

log = logging.getLogger(__name__)
# optuna (~0.2 s) and matplotlib (~1.3 s) are imported inside the functions that use them: the tests
# and `catsdogs run --train-config` import this module for its file names and trial settings only.

BEST_CONFIG = "best_config.json"
STUDY_CSV = "study.csv"
HISTORY_PNG = "optimization_history.png"
IMPORTANCE_PNG = "param_importances.png"
# Settings fixed for every trial: the tricks that measured as always helping, see docs/models.md.
FIXED: dict[str, Any] = {"augment": True, "tta": True}
PER_TRIAL_EXCLUDED = frozenset({"output", "resume", "max_steps", "checkpoint_every", "distributed",
                                "tracking_uri", "experiment", "register"})
"""TrainConfig fields that belong to one invocation and are left out of best_config.json."""


def suggest(trial: Any, model: str) -> dict[str, Any]:
    """Sample one trial's hyperparameters: the ones that mattered most in manual runs.

    From-scratch models search optimiser, learning rate, weight decay, width/depth, label smoothing,
    dropout, EMA and schedule; pretrained ones a lower learning-rate range and no architecture.
    """
    params: dict[str, Any] = {}
    if model in pretrained_names():
        params["optimizer"] = "adamw"
        params["lr"] = trial.suggest_float("lr", 3e-5, 1e-3, log=True)
        params["weight_decay"] = trial.suggest_float("weight_decay", 1e-4, 0.1, log=True)
    else:
        params["optimizer"] = trial.suggest_categorical("optimizer", ["adamw", "sgd"])
        if params["optimizer"] == "sgd":
            params["lr"] = trial.suggest_float("lr_sgd", 0.01, 0.3, log=True)
            params["weight_decay"] = trial.suggest_float("weight_decay_sgd", 1e-5, 1e-3, log=True)
        else:
            params["lr"] = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
            params["weight_decay"] = trial.suggest_float("weight_decay", 1e-4, 0.2, log=True)
        if model == "cnn":
            params["width"] = trial.suggest_categorical("width", [16, 24, 32, 48])
            params["depth"] = trial.suggest_int("depth", 0, 2)
        params["ema"] = trial.suggest_categorical("ema", [0.0, 0.99, 0.998])
    params["schedule"] = trial.suggest_categorical("schedule", ["cosine", "onecycle"])
    params["warmup_epochs"] = trial.suggest_float("warmup_epochs", 0.0, 1.0)
    params["label_smoothing"] = trial.suggest_float("label_smoothing", 0.0, 0.2)
    params["dropout"] = trial.suggest_float("dropout", 0.0, 0.5)
    return params


def trial_config(cfg: TuneConfig, params: dict[str, Any], out: Path) -> TrainConfig:
    """Build the TrainConfig of one trial (validated like a command-line config)."""
    base = {"data": cfg.data, "output": str(out), "model": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
            "threads": cfg.threads, "tracking_uri": cfg.tracking_uri, "experiment": cfg.experiment}
    return build_config(TrainConfig, base, FIXED, params)


def best_config_dict(train_cfg: TrainConfig) -> dict[str, Any]:
    """Return the TrainConfig fields worth reusing (no per-invocation ones like --output)."""
    return {k: v for k, v in to_dict(train_cfg).items() if k not in PER_TRIAL_EXCLUDED}


def _prune_files(folder: Path) -> None:
    """Drop a finished trial's checkpoints (tens of MB each); metrics.csv and config.json stay."""
    for name in (rundir.BEST_CKPT, rundir.LAST_CKPT):
        (folder / name).unlink(missing_ok=True)


class _Objective:
    """One Optuna trial: train a suggested config, report each epoch (pruning), keep the best files only."""

    def __init__(self, cfg: TuneConfig, trials_dir: Path, study_run: Any) -> None:
        self.cfg, self.trials_dir, self.study_run = cfg, trials_dir, study_run
        self.best_value, self.best_number = -math.inf, None

    def __call__(self, trial: Any) -> float:
        import optuna

        folder = self.trials_dir / f"{trial.number:04d}"
        if folder.exists():  # left over from an earlier study in the same --output
            shutil.rmtree(folder)
        train_cfg = trial_config(self.cfg, suggest(trial, self.cfg.model), folder)
        trial.set_user_attr("config", best_config_dict(train_cfg))
        trainer = Trainer(train_cfg)
        best_acc = 0.0
        trial_run = open_run("", "", f"trial-{trial.number:04d}", params=to_dict(train_cfg),
                             tags={f"{TAG_PREFIX}trial": trial.number}, parent=self.study_run)

        def report(row: dict[str, float | int]) -> None:
            nonlocal best_acc
            log_epoch(trial_run, row)
            best_acc = max(best_acc, float(row["val_acc"]))
            trial.report(float(row["val_acc"]), int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_acc {row['val_acc']:.4f} at epoch {row['epoch']}")

        trainer.on_epoch = report
        try:
            with ending(trial_run):
                try:
                    trainer.fit()
                except optuna.TrialPruned:
                    trial_run.set_tags({f"{TAG_PREFIX}trial_state": "pruned"})
                    trial_run.log_metrics({"best_val_acc": best_acc})
                    trial_run.finish("KILLED")  # MLflow's status for a run stopped before its end
                    raise
                trial_run.set_tags({f"{TAG_PREFIX}trial_state": "complete"})
                trial_run.log_metrics({"best_val_acc": best_acc})
        except optuna.TrialPruned:
            _prune_files(folder)
            raise
        self._keep_best(best_acc, trial.number, folder)
        return best_acc

    def _keep_best(self, value: float, number: int, folder: Path) -> None:
        """Keep only the best trial's checkpoint on disk."""
        if value > self.best_value:
            if self.best_number is not None:
                _prune_files(self.trials_dir / f"{self.best_number:04d}")
            self.best_value, self.best_number = value, number
        else:
            _prune_files(folder)


def run_study(cfg: TuneConfig) -> Any:
    """Run the search and write its outputs; return the Optuna study."""
    import optuna

    check_required(cfg)
    manifest = load_manifest(need(cfg, "data"))
    if manifest.split_rows("val") == 0:
        raise ConfigError(f"shards {cfg.data!r} have no val rows: tuning needs a validation split "
                          f"(re-run catsdogs preprocess with --val-frac > 0)")
    out = Path(need(cfg, "output"))
    trials_dir = out / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / schema.CONFIG_NAME)
    # The study is one MLflow run, each trial a run nested under it (no-ops when tracking is off).
    study_run = open_run(cfg.tracking_uri, cfg.experiment, f"tune-{out.resolve().name}", params=to_dict(cfg),
                         tags={**tracking_tags(cfg, manifest), f"{TAG_PREFIX}command": "tune"})
    objective = _Objective(cfg, trials_dir, study_run)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        # Prune below the median of earlier trials at the same epoch, once 2 trials finished and
        # after the first epoch (epoch-1 accuracy is noisy under warm-up).
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    # timeout stops starting new trials after --minutes; a running trial finishes its epochs.
    with ending(study_run):
        study.optimize(objective, n_trials=cfg.trials, timeout=cfg.minutes * 60.0, catch=())
        write_outputs(study, out)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        study_run.log_metrics({"trials": len(study.trials), "complete_trials": len(complete),
                               **({"best_val_acc": study.best_value} if complete else {})})
        for name in (STUDY_CSV, BEST_CONFIG, HISTORY_PNG, IMPORTANCE_PNG):
            study_run.log_artifact(out / name)
    return study


def tracking_tags(cfg: TuneConfig, manifest: Any) -> dict[str, str]:
    """The study run's lineage tags (computed only when tracking is on: it hashes files.csv)."""
    if not tracking_uri(cfg.tracking_uri):
        return {}
    return {**data_tags(need(cfg, "data"), need(cfg, "data"), manifest), **git_tags()}


def write_outputs(study: Any, out: Path) -> None:
    """Write best_config.json, study.csv and the optimisation-history plot (PNG)."""
    import optuna

    study.trials_dataframe().to_csv(out / STUDY_CSV, index=False)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        cfg = dict(best.user_attrs["config"])
        atomic_write_text(out / BEST_CONFIG, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        log.info("best trial %d: val_acc %.4f", best.number, best.value)
    plot_history(study, out)


def plot_history(study: Any, out: Path) -> None:
    """Save Optuna's optimisation history (and parameter importances with >= 3 trials) as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # "few trials per regime" notes on tiny studies
        ax = ovm.plot_optimization_history(study, target_name="val accuracy")
        ax.figure.set_size_inches(8, 4.5)
        ax.figure.tight_layout()
        ax.figure.savefig(out / HISTORY_PNG, dpi=100)
        plt.close(ax.figure)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) >= 3:
            try:
                ax = ovm.plot_param_importances(study)
            except (ValueError, RuntimeError) as exc:  # e.g. all trials sampled the same values
                log.info("no importance plot: %s", exc)
            else:
                ax.figure.set_size_inches(8, 4.5)
                ax.figure.tight_layout()
                ax.figure.savefig(out / IMPORTANCE_PNG, dpi=100)
                plt.close(ax.figure)


def main(cfg: TuneConfig) -> int:
    """Entry point of ``catsdogs tune``."""
    import optuna

    study = run_study(cfg)
    out = Path(need(cfg, "output"))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    print(f"{len(study.trials)} trials ({len(done)} complete, {len(pruned)} pruned); outputs in {out}")
    if done:
        print(f"best val_acc {study.best_value:.4f} (trial {study.best_trial.number}); "
              f"train with: catsdogs train --config {out / BEST_CONFIG} --output RUN")
    return 0
