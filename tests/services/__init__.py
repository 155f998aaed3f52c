"""Real services for launcher tests, on loopback only, each a context manager that stops what it started.

- `sshd.ssh_nodes`: one sshd on 127.0.0.1 and 127.0.0.2 posing as two nodes, for pdsh.
- `slurm.slurm_cluster`: munged, slurmctld and slurmd for a one-node Slurm cluster.
"""
