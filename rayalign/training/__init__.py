"""Training without Ray or DeepSpeed: preference data, batches and the loss of a micro-batch (data), and online rollouts (rollouts)."""
