"""Optional experiment tracking to local files (``--log tensorboard | mlflow``); nothing is sent
anywhere. Each fold logs the values of its history.csv, one step per epoch, and the resolved
config once:

    tensorboard   <out_dir>/<run>/fold<k>/tensorboard/   (tensorboard --logdir <out_dir>)
    mlflow        <out_dir>/mlflow.db (MLflow's local SQLite store), experiment <run>, one MLflow run
                  per fold (mlflow ui --backend-store-uri sqlite:///<out_dir>/mlflow.db)
"""
from __future__ import annotations

from pathlib import Path

import yaml


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """``log(row)`` once per epoch with the history row; ``close()`` when the fold ends."""

    def __init__(self, kind: str, config: dict, fold_dir: Path, fold: int, experiment: str, mlflow_db: Path):
        """``kind``: none, tensorboard or mlflow; ``config``: the resolved config, logged once;
        ``experiment``: MLflow's experiment (the run's name), kept in the SQLite store ``mlflow_db``."""
        self.kind, self.writer, self.config = kind, None, config
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--log tensorboard needs the tensorboard package: pip install tensorboard") from err
            self.writer = SummaryWriter(log_dir=str(fold_dir / "tensorboard"))
            self.writer.add_text("config", "```\n" + yaml.safe_dump(self.config, sort_keys=False) + "```")
        elif self.kind == "mlflow":
            try:
                import mlflow
            except ImportError as err:
                raise ImportError("--log mlflow needs MLflow: pip install mlflow-skinny") from err
            mlflow.set_tracking_uri(f"sqlite:///{Path(mlflow_db).resolve()}")
            mlflow.set_experiment(experiment)
            self.writer = mlflow.start_run(run_name=f"fold{fold}")
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(self.config).items()})

    def log(self, row: dict) -> None:
        values = {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()
        elif self.kind == "mlflow":
            import mlflow

            mlflow.log_metrics(values, step=int(row["epoch"]))

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "mlflow":
            import mlflow

            mlflow.end_run()
