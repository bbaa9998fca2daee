"""DYNAMO: one frozen encoder, one LoRA adapter + head per task, a learned router that mixes
the adapters per input (models/dynamo.py), trained in phases on the one loop (task.py,
stages.py); data (sources.py, data.py, batches.py), QA (qa.py), generation (seq2seq.py),
metrics (metrics.py) and the evaluation table (evaluate.py). docs/dynamo.md explains it."""
