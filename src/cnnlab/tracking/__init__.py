"""Everything that talks to MLflow: the store, the run writer and its journal, queries."""
