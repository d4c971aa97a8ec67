"""Measuring a model: perplexity on held-out data, and our decoder as an lm-eval harness model.

Nothing is imported here, so that `finetune.evaluation.perplexity` does not pull in the
optional lm-eval that `finetune.evaluation.harness` builds on.
"""
