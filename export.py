"""Export the ensemble's fold checkpoints to ONNX, check parity, quantise, and choose how to serve.

    python export.py                         # runs of ensemble.json (or every run) -> <out-dir>/onnx/
    python export.py --int8                  # also int8 static quantisation (QDQ), with its OOF score change
    python export.py --budget-ms 500         # serve the best configuration whose p99 (or max), measured here, fits

Every fold's ``best.pt`` becomes ``onnx/<run>_fold<k>.onnx`` (dynamic batch; schema and
preprocessing embedded as metadata). Each export is checked against PyTorch on real images of its
fold's validation rows: maximum absolute logit difference (must be <= 1e-3) and identical decoding.
When all members share one preprocessing, the whole ensemble (folds, weights, biases) is also
exported as one graph, ``onnx/ensemble.onnx`` (the folds' files joined under the blend, each weight
stored once); both ways are timed single-stream and the faster one is recorded in
``onnx/manifest.json`` (``use``), which infer.py follows. With ``--budget-ms``, every complete run
is exported (a distilled student too), and every candidate configuration (the ensemble, smaller
ensembles, each run alone; merged, fp32, int8 members; all folds or one) is scored by nested CV and
timed end to end here: of those that fit, the fewest members within one standard error of the best
score is written to the manifest (``serve``), with every candidate in ``onnx/budget.csv``
(utils/serve/budget.py); the merged graph of each candidate is built there, and no
``ensemble.onnx``.

Latency of the seed's backbones at 224 px: ``python -m utils.bench.latency``.
"""
from utils.config import run_command
from utils.serve.export import ExportConfig, export

if __name__ == "__main__":
    run_command(export, ExportConfig, __doc__)
