"""A sweep's runs as SLURM or PBS Pro job arrays: scripts, submission, job states, cancellation.

    spec        what the user asks for (scheduler, account, queue, time, GPUs/nodes/CPUs/memory per
                run, a throttle, extra directives), validated: nothing hostile reaches a script
    shell       the one way text is put into a job script (quoted words, expansions by name)
    launch      the per-run entry point a task runs, and the torchrun launcher for its allocation
    states      the scheduler-neutral task states (PENDING ... COMPLETED, FAILED, CANCELLED, TIMEOUT)
    slurm, pbs  each scheduler's script, submit, query and cancel commands, and their parsers
    arrays      which runs go into which array: one task per run, eval after train task-wise
    submit      submit / dry-run / states / cancel for a sweep directory, with the job-id ledger
    cli         `sweep submit`, `sweep jobs`, `sweep cancel`

Tasks never open the registry: each runs `python -m <entry> --sweep DIR --run RUN_ID --stage S`,
which writes only its own run directory (`launch.STAGE_ENTRY_MODULE`).
"""
