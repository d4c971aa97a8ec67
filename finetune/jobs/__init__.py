"""The pipeline side: what a job needs around a recipe run (object storage for inputs and results)."""
