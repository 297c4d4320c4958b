"""Dataset loaders (BeaverTails, MMLU; hub ids or local files), chat formatting and batching,
and the embedded offline data (harmful/benign prompts, refusal targets, utility tasks)."""
