"""rar_edge: RAR retrieval + ranking for edge devices."""
