"""The applications: train, predict, checkpoint export, benchmark, the lab and its report.
Only apps choose a backend, through `jaxvision.apps.backends`."""
