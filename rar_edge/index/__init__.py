"""The memory: vectors, labels and ids; native exact top-k or HNSW; k distinct classes; the memory file."""
