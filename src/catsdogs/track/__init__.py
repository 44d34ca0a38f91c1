"""MLflow tracking and model registry, stage-neutral: the logger facade, the pyfunc model, models:/ URIs.

Off unless a tracking URI is set; mlflow is imported only then (it costs ~1-6 s at import).
"""
