"""catsdogs' heavy forward passes as Spark jobs: the frozen feature pass, evaluate, audit and batch predict.

``standalone`` starts a loopback standalone cluster (to try ``--master spark://`` on one machine);
``ship`` sends the driver's engine graph and checkpoint to the executors, which build each once per
process; ``shardjob`` runs one task per shard (group) and brings the arrays back; ``features`` and
``answers`` are the per-batch work of training, audit and evaluate; ``predict`` is ``catsdogs predict
--master``.
"""
