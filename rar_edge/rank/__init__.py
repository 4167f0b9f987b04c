"""The MLLM ranker: prompts, the ranker, and the raw llama.cpp / mtmd layer it drives."""
