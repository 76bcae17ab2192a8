"""Optuna hyperparameter search on the real training code, shareable by many workers.

    python tune.py --model efficientnet_b0 --fold 0 --n-trials 20
    python tune.py --model resnet18 --fold 0 --n-trials 8 --storage sqlite:///runs/tune.db --study-name r18
    # N workers on one study (one machine: sqlite or a journal file; a cluster: PostgreSQL/MySQL URL)
    for i in 1 2 3 4; do python tune.py --model resnet18 --fold 0 --n-trials 5 \\
        --storage journal:runs/tune.journal --study-name r18 & done; wait
    python tune.py --model resnet18 --config configs/tune_tiny.yaml   # tiny budget, for a quick look

What a trial is, what the study writes, and how a killed worker's trial is retried:
utils/train/tune.py.
"""
from utils.config import run_command
from utils.train.tune import TuneConfig, tune

if __name__ == "__main__":
    run_command(tune, TuneConfig, __doc__, model_config=True)
