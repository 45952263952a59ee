"""The API side of the distillation service: HTTP, schemas, database, store. Never imports torch."""
