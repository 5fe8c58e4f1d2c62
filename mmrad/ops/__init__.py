"""Operations: MLflow ``tracking`` (the register stage), the model ``registry`` (promote / rollback), ``serving``
(the MLflow pyfunc and its input rule) and ``predict`` (image files -> scores and overlays)."""
