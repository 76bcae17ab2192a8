"""Write submission.csv: the ensemble on the test images, streamed in batches.

    python infer.py                                   # demo run -> submission.csv
    python infer.py --data-dir data/real --out-dir runs/real --output subs/real.csv
    python infer.py --backend torch                   # PyTorch checkpoints instead of ONNX
    python infer.py --tta-hflip                       # average with the mirrored image
    python infer.py --from-logits                     # from train.py's saved test logits, no images

What is served, how each image is prepared, and what a bad image gets: utils/serve/infer.py.
"""
from utils.config import run_command
from utils.serve.infer import InferConfig, infer

if __name__ == "__main__":
    run_command(infer, InferConfig, __doc__)
