"""How a model is judged: top-1 (metrics.py), a backbone's features by k-NN, probe and similarity, and the
feature Fisher (features.py), a linear probe trained on frozen features (probe.py)."""
