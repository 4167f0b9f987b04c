"""The SDK's defaults, named once: every function, config and CLI option that has one of these reads it here."""

#: Candidates retrieved and ranked per query (RAR's k).
K = 5
#: Images or texts per encoder call.
BATCH_SIZE = 16
#: hnswlib graph degree, build-time and search-time candidate list sizes (`rar_edge.HnswParams`).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF = 512
#: The ranking prompt (`rar_edge.rank.prompts`) used when neither the caller nor the model folder names one.
PROMPT_VERSION = "rar-rank-v1"
