"""Evaluation: multiple-choice log-likelihood scoring, generation with a refusal judge,
safety tax, confidence intervals, and the MetricsReporter (JSON, CSV, Markdown, PNG)."""
