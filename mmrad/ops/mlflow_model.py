"""The file MLflow logs as the model's code (MLflow "models from code"): no pickled objects.

``mlflow.pyfunc.load_model`` runs this file with the logged copy of the
``mmrad`` package importable (``code_paths``), and serves the model it sets.
"""

from mlflow.models import set_model

from mmrad.ops.serving import MMRADModel

set_model(MMRADModel())
