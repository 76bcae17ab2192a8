"""Stage 3, ensembling: the competition metric, members' out-of-fold logits blended, and the search for
their weights and biases."""
