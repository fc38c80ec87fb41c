"""The job control plane: the runner that queues and runs fine-tune jobs (``scheduler``),
the RayJob launcher (``rayjob``), registry change notices to the replicas (``notices``), and
jobs run from this process (``local``: ``refit finetune --local``, ``refit run-job``)."""
