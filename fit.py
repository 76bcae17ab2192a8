"""One command, a time budget, the best submission it allows: measure this machine and this data,
plan the whole pipeline for the time given, run it, and say how the plan went.

    python fit.py --data-dir D --budget 30m --model tf_efficientnet_lite0 --pretrained-file W
    python fit.py --data-dir D --budget 10m --pretrained --model resnet18,efficientnet_b0
    python fit.py --data-dir data/demo --budget 5m --train-config configs/visual_taxonomy.yaml

Measures each backbone's training and forward speed (and the faster precision) at the sizes it
may use, the decoding speed and the data's own resolution; then plans: the frozen route first (a
submission in seconds, and a teacher), at sizes that grow while they pay; fine-tuning of the best
backbone at the size, epochs and learning rate (searched by successive halving on fold 0) that
the budget buys; the ensemble; a distilled student where the ensemble would be too slow to serve;
export.py --budget-ms; the submission of what is served. Prints the plan (stage, candidate,
predicted seconds, the rule behind it) before the work, again whenever a stage ran a quarter off
its prediction, and at the end every stage's actual seconds beside its prediction. Ends within the budget plus 10 %; a
budget too small for even the frozen route is refused before any training, naming the least
that would do. A re-run with the same options goes on where the last one stopped.

The rules: utils/fit/plan.py; the measurements: utils/fit/measure.py; the run: utils/fit/run.py.
Figures against fixed recipes and timm's train.py at equal wall time: BENCHMARKS.md, "fit.py: a time
budget".
"""
import warnings

from utils.config import run_command
from utils.fit.run import FitConfig, fit

if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShiftScaleRotate.*")
        run_command(fit, FitConfig, __doc__)
