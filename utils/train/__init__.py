"""Stage 2, training: the fold trainer (fine-tuned and frozen-feature routes), its engine, models and
losses, distillation, distributed plumbing and hyperparameter search."""
