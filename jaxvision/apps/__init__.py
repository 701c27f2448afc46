"""The applications: train, predict, evaluate, checkpoint export, benchmark, the lab and its
report. Only apps choose a backend, through `jaxvision.apps.backends`."""
