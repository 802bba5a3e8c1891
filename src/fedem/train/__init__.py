"""Pretraining, continued pretraining and LoRA fine-tuning: one code path over the HF Trainer."""
