"""kiln: a compiler for fast, small PyTorch inference."""
