"""lm-evaluation-harness task files shipped with fedfuse: one YAML per skill, the shared template, the metric."""
