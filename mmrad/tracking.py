"""Where models registered before the package had subpackages find their code: ``mmrad.tracking.MMRADModel``.

Such a version's logged ``mlflow_model.py`` runs ``from mmrad.tracking import
MMRADModel``. A process that already imported this package (``mmrad predict
--model models:/mmrad@champion``, a rollback check) does not re-import it from
the model's logged code, so without this alias those versions could not be
loaded. New versions import ``mmrad.ops.serving`` directly.
"""

from mmrad.ops.serving import MMRADModel

__all__ = ["MMRADModel"]
