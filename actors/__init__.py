"""Ray actors and actor groups (installed as rayalign.actors)."""
