"""Real-model suites: nothing is ever downloaded (models are built from configs with random
weights), so the HuggingFace hub is put offline before any test module imports transformers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
