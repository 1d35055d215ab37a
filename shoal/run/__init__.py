"""The run layer: from what the user asked for to a finished run, for every way in.

``shoal train`` (:mod:`shoal.cli`), :func:`shoal.train`, :mod:`shoal.ray` and
:mod:`shoal.spark` hand a :class:`~shoal.run.resolve.Request` (a job file or a
job, plus the values set by name) to this layer, which resolves and checks the
job (:mod:`~shoal.run.resolve`), takes its run directory
(:mod:`~shoal.run.directory`) and runs it: with shoal's launcher on this machine
(:mod:`~shoal.run.local`), as guests of another launcher (:mod:`~shoal.run.guest`:
torchrun, srun, Kubeflow) or of an engine (:mod:`~shoal.run.engines`: Ray Train,
PySpark's TorchDistributor); then the summary (:mod:`~shoal.run.summary`).
"""
