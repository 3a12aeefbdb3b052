"""The scoring pass (Ray, models and files; the reward math itself is in rayalign.rewards): the forward specs and
their columns (forward), what a recipe's pass needs (setup: model roles, specs, pooled layers, extra prompt
columns), ICR's R_t translations by the policy (translation), LaCoMSA language centroids pooled from the user's
monolingual text files (centroid_texts), rewards from forward results (rewards), and the hub-layer scan
(hub_scan)."""
