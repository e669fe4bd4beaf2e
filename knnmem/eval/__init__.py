"""The long-document evaluation (`knnmem eval`)."""
