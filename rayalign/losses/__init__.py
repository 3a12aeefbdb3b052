"""Losses: the DPO family of preference losses (preference) and the policy-gradient losses of online RL (rl)."""
