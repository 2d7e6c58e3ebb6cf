"""The throughput benchmark's library: one module per section, run by ``ssl_colorize.benchmarks.throughput``.

* :mod:`~ssl_colorize.throughput.loss`: soft encoding + rebalanced loss, ours against the released code's way;
* :mod:`~ssl_colorize.throughput.pretrain`: the trainer's own loop against compute only and the reference data path;
  :mod:`~ssl_colorize.throughput.trainer` runs the trainer (its configurations, an ImageFolder, its data path
  alone), :mod:`~ssl_colorize.throughput.worker_cost` times one data worker's stages and
  :mod:`~ssl_colorize.throughput.machine` the device's matrix rate (model FLOP utilisation);
* :mod:`~ssl_colorize.throughput.probe`: five taps in one frozen pass against five single-tap runs;
* :mod:`~ssl_colorize.throughput.measure` / :mod:`~ssl_colorize.throughput.report` /
  :mod:`~ssl_colorize.throughput.runner`: timing and memory, the table and verdicts, one process per measurement.
"""
