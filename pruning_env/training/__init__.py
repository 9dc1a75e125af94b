"""Training: baseline training, fine-tuning (with knowledge distillation) and the finalize pipeline."""
