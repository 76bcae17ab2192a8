"""Stage 1, data: a dataset folder in the competition layout read into a schema of heads, its folds,
its images decoded, sized and transformed, and the generated and real-photo datasets."""
