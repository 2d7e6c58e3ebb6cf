"""What every long job shares: the error convention (cli.py), the run folder (run.py) and the
fine-tuning engine (finetune.py)."""
