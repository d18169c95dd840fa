"""A sweep's runs as SLURM or PBS Pro job arrays: scripts, submission, job states, cancellation.

    spec        what the user asks for (scheduler, account, queue, time, GPUs/nodes/CPUs/memory per
                run, the assets job's own resources, a throttle, extra directives), validated:
                nothing hostile reaches a script
    shell       the one way text is put into a job script (quoted words, expansions by name)
    launch      what a job runs: the per-run entry point, the assets job's command, the torchrun
                launcher for a task's allocation (and `launcher_from_env`, which the executor reads)
    states      the scheduler-neutral task states (PENDING ... COMPLETED, FAILED, CANCELLED, TIMEOUT)
    slurm, pbs  each scheduler's script, submit, query and cancel commands, and their parsers
    arrays      which runs go into which array: the assets job first when an asset is missing, one
                task per run, eval after train task-wise
    submit      submit / dry-run / states / cancel for a sweep directory, with the job-id ledger
    cli         `sweep submit`, `sweep cancel` (`sweep status` shows the states, in the study's CLI)

Tasks never open the registry: each runs `python -m modelzoo_ext.study.sweep.task --sweep DIR
--run RUN_ID --stage S` (`launch.STAGE_ENTRY_MODULE`), which writes only its own run directory and
builds no shared asset; the assets job (`sparse-lora sweep assets`) builds them before the arrays.
"""
