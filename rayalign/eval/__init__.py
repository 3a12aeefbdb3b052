"""Evaluation: language fidelity, RankC and accuracy on parallel candidate sets, reward statistics, the silhouette
of pooled states per layer (the semantic-hub scan), and an optional LLM-as-judge win rate."""
