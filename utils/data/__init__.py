"""Stage 1, data: a dataset folder in the competition layout read into a schema of heads, its folds,
the augmentations by name, and its images decoded, sized and transformed."""
