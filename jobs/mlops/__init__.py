"""The MLflow layer: run tracking, the model registry, lineage and the pyfunc model."""
