"""The scoring pass: forward specs and their columns (forward), the model roles a recipe needs (setup), rewards from forward results (rewards), and the hub-layer scan."""
