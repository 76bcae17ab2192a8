"""Stage 3, ensembling: the search for the members' weights and biases over their out-of-fold logits
(the metric and the blend are shared modules at utils/'s top: every stage scores and blends)."""
