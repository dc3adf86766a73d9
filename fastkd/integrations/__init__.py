"""Integrations of fastkd with other libraries (optional dependencies, imported on demand).

- `fastkd.integrations.transformers`: `DistillationTrainer`, `DistillationArguments` and the
  plain-loop helper `causal_lm_distillation_loss` for Hugging Face causal language models
  (install with ``pip install fastkd[hf]``).

Importing `fastkd` or this package never imports transformers.
"""
