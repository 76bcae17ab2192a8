"""Ensemble-weight search over out-of-fold logits, judged by nested cross-validation.

    python ensemble.py                                   # every complete run under --out-dir
    python ensemble.py --models resnet18,efficientnet_b0 --method sto
    python ensemble.py --per-head --bias on

Each member is a run's OOF logits over the whole train set (all its folds), as per-head
log-probabilities. Every method of ``--compare`` (the search itself is ``utils/ensemble/search.py``), with
and without per-class biases, is judged by nested CV: for every held-out fold, weights (and biases)
are fitted on the other folds' OOF rows and applied to the held-out rows; the assembled held-out
predictions are scored once. The table shows that score for every method, its gain over equal
weights and over the best single model, and its time. The chosen method is then refitted on all
OOF rows and written to ``<out-dir>/ensemble.json``, which export.py and infer.py read, with
``ensemble_heads.png`` (per-head score of the best single model against the ensemble), and each
held-out fold's fit (``fold_fits``: weights and biases fitted without that fold, which an honest
student's fold learns from, utils/train/distill.py).

Timing of the search at the real scale: ``python -m utils.bench.ensemble``.
"""
from utils.config import run_command
from utils.ensemble.ensemble import EnsembleConfig, ensemble

if __name__ == "__main__":
    run_command(ensemble, EnsembleConfig, __doc__)
