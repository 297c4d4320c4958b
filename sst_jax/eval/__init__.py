"""Evaluation: multiple-choice log-likelihood scoring, generation with a refusal judge,
safety tax, confidence intervals, and the MetricsReporter (JSON, CSV, Markdown, PNG).

  mc       mc_prompt (lm-eval MMLU format), mc_context (k-shot), evaluate_mc -> MCResult
  judge    Judge protocol, KeywordRefusalJudge (GCG test prefixes), RefusalRuleJudge (an apology
           is not a refusal), is_degenerate, cohen_kappa, judge_agreement (a judge vs hand labels)
  semantic_judge  SemanticRefusalJudge ("semantic-lr-v1": logistic regression on SmolLM2-135M
           features of the response, fitted on the shipped hand labels), response_features
  logistic fit_logistic (L2, Newton), cross_validate (stratified k-fold choice of the penalty)
  scoring  score: refusal / over-refusal / utility NLL of any ΔW on any prompt sets; rescore:
           a stored evaluation re-judged by any judge
  safety   evaluate_refusal -> RefusalResult, generate_responses, evaluate_generative,
           teacher_forced_nll, refusal_nll -> NLLResult
  metrics  Estimate, proportion (Wilson), bootstrap_interval, paired_comparison (McNemar +
           paired bootstrap), safety_tax, composite_score, distance_to_ideal, pareto_front,
           hypervolume_2d
  report   MetricsReporter, write_table, write_text, plot_safety_utility, plot_tax_bars,
           plot_retention
"""
