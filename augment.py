"""The seed's offline class-balancing augmentation: grow under-represented classes, write
augmented_train.csv.

    python augment.py --data-dir data/demo --out-dir runs/demo_aug --attr attr_1 --aug-percentage 0.5
    python augment.py --data-dir data/demo --out-dir runs/demo_aug --attr all
    python train.py --model resnet18 --train-csv runs/demo_aug/augmented_train.csv ...

The algorithm, its tiers and pipelines: utils/data/balance.py.
"""
from utils.config import run_command
from utils.data.balance import AugmentConfig, balance

if __name__ == "__main__":
    run_command(balance, AugmentConfig, __doc__)
