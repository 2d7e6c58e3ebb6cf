"""Run any entry point on SLURM through submitit: one job, a sweep as one job array, a DDP job.

    python -m ssl_colorize.launch submit [cluster options] -- ENTRYPOINT [ARGS...]   (slurm/submit.py)
    python -m ssl_colorize.launch sweep SWEEP.toml [options]                         (slurm/sweep.py)

Modules: :mod:`.entry` (which module a spec names, its parser and its own validation, argv editing),
:mod:`.cluster` (cluster options, the submitit executor, the queue), :mod:`.submit` (the job, one job
or a job array, what became of a job), :mod:`.sweep` (sweep files, plans, the manifest),
:mod:`.watch` (the snapshot watcher).

The contract between this launcher and an entry point (``ssl_colorize.pretrain``, ``ssl_colorize.benchmarks.*``)
-------------------------------------------------------------------------------------------------------------
* The entry point is a module exposing ``get_args_parser()``, ``validate(args)`` and ``main(args)``
  (``ssl_colorize.engine.cli``); ``benchmarks/NAME.py`` stands for ``ssl_colorize.benchmarks.NAME``.
  A job runs exactly the arguments it would take locally: ``main(get_args_parser().parse_args(argv))``.
  Before anything is submitted (``--dry-run`` too) every job's arguments go through the entry point's
  parser and ``validate`` (``ssl_colorize.engine.cli.check_args``): a refused job is one line naming
  the entry point and the reason, exit 2, and nothing is submitted or written.
* Options the launcher sets, each only where the entry point's parser has it (the run contract,
  ``ssl_colorize.engine.run.add_run_args``):

  ``--out DIR``        the run folder, with the entry point's rolling checkpoint, written atomically at
                       regular intervals, holding everything needed to continue exactly.
  ``--resume``         (a flag) continue the run in ``--out`` from that checkpoint, or start fresh when
                       there is none. The launcher adds it to every sweep job, to a job SLURM restarts
                       (``scontrol requeue``, node failure: ``SLURM_RESTART_COUNT`` > 0) and to the
                       submission that submitit requeues after a preemption or time-limit signal
                       (:meth:`.submit.EntryPointJob.checkpoint`). An entry point whose ``--resume``
                       still takes a value gets ``--resume auto``.
  ``--run-id ID``      stored in every result row. A sweep derives it from the entry point's module and
                       its arguments (:func:`.sweep.run_id_for`), so it is stable across re-submissions.
  ``--out-csv CSV``    the results table; rows go in with :func:`ssl_colorize.results.append_rows`
                       (file-locked and atomic), once, at the end, from rank 0 only. A sweep treats a
                       grid point as finished when this table holds rows with its run id, and a job whose
                       run id already has rows there does not run again.
* Multi-process jobs (several tasks per node, several nodes): submitit's ``TorchDistributedEnvironment``
  exports the torchrun variables (:func:`ssl_colorize.distributed.export_submitit_layout`) and the job
  joins the process group (:func:`ssl_colorize.distributed.init_distributed`: NCCL on GPUs, gloo on
  CPUs) before calling ``main``; ``main`` calls ``init_distributed()`` itself too (it is idempotent), so
  torchrun works the same way, and uses ``distributed.is_main()`` for files and rows.
* Outputs of the launcher (submitit's logs, sweep run folders, the sweep manifest) go under the
  current working directory unless given: ``runs/slurm/%j``, ``runs/<sweep name>/...``.
"""
