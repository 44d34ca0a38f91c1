"""Forward-only engines: a model's feature extractor run by torch eager, onnxruntime or OpenVINO.

Each takes normalised images and returns pooled features, in float32 or int8.

``names`` is light (the config imports its choice list); ``factory.create_engine`` builds one, exporting
and quantising the graph once and caching it beside the run (``rundir.RunDir.engine_dir``).
"""
