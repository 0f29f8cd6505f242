"""Credential -> batch job and tunnel: the SLURM-over-SSH spawner."""
