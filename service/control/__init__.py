"""The job control plane: the runner that queues and runs fine-tune jobs (``scheduler``,
Ray-free), the one interface its launchers share (``launchers``) and the two launchers (job
processes on this Ray: ``in_cluster``; KubeRay RayJobs: ``rayjob``), the runner as a detached
actor and how the API reaches it (``runner_clients``), retrain policies evaluated by the
runner (``retrain_triggers``), registry change notices to the replicas (``notices``), and jobs
run from this process (``local``: ``refit finetune --local``, ``refit run-job``)."""
