"""K-fold training of any timm backbone with one head per (category, attribute).

    python train.py --model efficientnet_b0 --fold 0          # fold 0, trained on the others
    python train.py --model resnet18 --fold all               # every fold in turn
    python train.py --model resnet18 --fold all --resume      # continue after an interruption
    python train.py --model densenet121 --config configs/demo.yaml --epochs 3 --img-size 128
    torchrun --nproc_per_node 2 train.py --model resnet18 --fold 0   # DistributedDataParallel

Config: the defaults below < configs/<model>.yaml < --config files < flags (utils/config.py).
Writes <out-dir>/schema.json and folds.csv on first use, then for each fold, in
<out-dir>/<name>/fold<k>/: best.pt, last.pt, oof_logits.npz, test_logits.npz, history.csv/.png,
metrics.json, config.yaml (utils/train/kfold.py runs the folds; utils/train/fold.py is one fold). When every fold of the run is
done, its OOF score over the whole train set is printed and written to <name>/oof_score.json.
Training throughput: python -m utils.bench.train.
"""
import warnings

from utils.config import run_command
from utils.data.schema import read_dataset
from utils.train.config import TrainConfig


def main(cfg: TrainConfig) -> dict:
    data = read_dataset(cfg.data_dir, cfg.train_csv)
    cfg.check_data(data)  # a config naming what the data lacks is refused here, before torch is imported
    from utils.train.kfold import train

    return train(cfg, data)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShiftScaleRotate.*")
        run_command(main, TrainConfig, __doc__, model_config=True)
