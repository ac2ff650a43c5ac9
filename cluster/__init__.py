"""Ray: start or attach a cluster, run the workers under Ray Train's TorchTrainer, submit jobs,
and the `embshard` command line. Nothing imports this package."""
