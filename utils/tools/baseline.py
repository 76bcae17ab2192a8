"""The majority-class baseline: every head predicts its most frequent train class.

    python -m utils.tools.baseline --data-dir data/demo --out runs/demo/baseline_submission.csv

Prints the score when ``<data-dir>/test_solution.csv`` exists (the demo data has one).
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.config import DataConfig, option, run_command
from utils.data.schema import CATEGORY, ID, Schema, read_dataset
from utils.metric import solution_score
from utils.serve.submission import majority_logits, make_submission, write_submission


@dataclass
class BaselineConfig(DataConfig):
    out: str = option("runs/demo/baseline_submission.csv", "the submission to write")


def main(cfg: BaselineConfig) -> float | None:
    data = read_dataset(cfg.data_dir)
    schema = Schema.fit(data.train, data.category_attrs)
    sub = make_submission(data.test[ID], data.test[CATEGORY], majority_logits(schema, len(data.test)), schema)
    write_submission(sub, data.test, schema, cfg.out)
    result = solution_score(cfg.data_dir, sub, data.category_attrs)
    print(f"majority baseline written to {cfg.out}" + (f"; score {result:.4f}" if result is not None else ""))
    return result


if __name__ == "__main__":
    run_command(main, BaselineConfig, __doc__)
