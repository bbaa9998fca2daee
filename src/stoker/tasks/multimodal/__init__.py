"""Multimodal: frozen image and audio encoders (models/multimodal.py), a contrastive aligner
(phase 1) and projectors + a LoRA language model (phase 2); the offline digits task and the
readers of users' image/audio files (sources.py)."""
