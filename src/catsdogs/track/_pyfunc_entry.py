"""MLflow "model from code" entry point: MLflow copies this file into a saved model and runs it.

Running it builds the model (no pickle). catsdogs itself never imports it; see :mod:`catsdogs.track.pyfunc`.
"""

from mlflow.models import set_model

from catsdogs.track.pyfunc import CatsdogsModel

set_model(CatsdogsModel())
