"""An open reward for rayalign: `rewards.user.path: rewards/language_fidelity.py`.

rayalign calls `reward(group)` once per prompt_id with that prompt's samples in every language
(dicts with prompt_id, lang, sample_idx, messages, response, lang_detected, logp_policy, ...) and
expects one float per sample, in the same order. This file runs as code: name only files you trust.
"""


def reward(group):
    """1 for a response in the prompt's language, 0 otherwise, minus a small penalty for length."""
    return [(1.0 if s["lang_detected"] == s["lang"] else 0.0) - 0.001 * len(s["response"]) for s in group]
